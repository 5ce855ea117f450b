"""The committed gRPC stubs are what grpcio-tools generates from proto/ today."""

from __future__ import annotations

import pytest


def test_stubs_are_current():
    pytest.importorskip("grpc_tools")
    from spruce.server.protogen import main

    assert main(["--check"]) == 0, "run: python -m spruce.server.protogen"
