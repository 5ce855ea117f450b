"""``python -m spruce``: the same as the ``spruce`` command."""

import sys

from spruce.cli import main

sys.exit(main())
