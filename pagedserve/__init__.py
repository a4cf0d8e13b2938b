"""pagedserve: an LLM serving cluster built around PagedAttention, on Ray.

The public names load lazily so that `pagedserve.scheduler` stays importable without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedserve.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "EngineConfig": "pagedserve.config",
    "SamplingParams": "pagedserve.sampling_params",
    "BeamSearchParams": "pagedserve.sampling_params",
    "RequestOutput": "pagedserve.engine.outputs",
    "CompletionOutput": "pagedserve.engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
