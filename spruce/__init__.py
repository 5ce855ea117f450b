"""spruce: speculative decoding with token trees, verified in one target pass, lossless output.

Public API: ``Engine``, ``SamplingParams``, ``SpeculationConfig``, ``GenerationOutput``, ``SpecStats``.
Heavy modules (torch models, transformers) load on first use of ``Engine``, not at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spruce.config import SamplingParams, SpeculationConfig
from spruce.errors import InvalidRequestError, ModelLoadError, SpruceError
from spruce.stats import SpecStats

if TYPE_CHECKING:
    from spruce.engine import DEFAULT, Engine, GenerationOutput

__version__ = "0.1.0"

_LAZY = {"Engine", "GenerationOutput", "DEFAULT"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from spruce import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'spruce' has no attribute {name!r}")


__all__ = [
    "DEFAULT",
    "Engine",
    "GenerationOutput",
    "InvalidRequestError",
    "ModelLoadError",
    "SamplingParams",
    "SpecStats",
    "SpeculationConfig",
    "SpruceError",
    "__version__",
]
