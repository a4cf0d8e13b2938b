"""Tiny checkpoints shared by the worker tests (written once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """variant -> directory of a tiny random checkpoint of that variant (cached)."""
    saved: dict[str, Path] = {}

    def get(variant: str = "llama") -> Path:
        if variant not in saved:
            saved[variant] = save_tiny_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return saved[variant]

    return get
