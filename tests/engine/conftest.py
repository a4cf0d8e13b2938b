"""Fixtures of the engine tests: tiny checkpoints (one per variant) and HF references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.engine_utils import HFReference
from tests.helpers.tiny_models import save_tiny_checkpoint
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant -> directory of its tiny random checkpoint (written once per session)."""
    saved: dict[str, Path] = {}

    def get(variant: str = "llama") -> Path:
        if variant not in saved:
            saved[variant] = save_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{variant}"),
                                                  variant)
        return saved[variant]

    return get


@pytest.fixture(scope="session")
def hf() -> HFReference:
    return HFReference()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny byte-level test model (one token per byte, random weights), written under a
    temporary PAGEDSERVE_CACHE: a fast model with a tokenizer and a chat template."""
    from pagedserve.engine.default_model import ensure_tiny_test_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.mktemp("pagedserve-cache")))
        return ensure_tiny_test_model()


@pytest.fixture(scope="session")
def tiny_text_llm(tiny_text_model: str):
    """An `LLM` of the tiny byte-level test model, on CPU."""
    from pagedserve.llm import LLM

    return LLM(model=tiny_text_model, device="cpu")
