"""A config-only tiny checkpoint (Worker construction reads config.json alone), and torch's
thread count put back after tests whose Worker sets it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import tiny_config


@pytest.fixture(scope="session")
def config_only_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config-only-llama")
    tiny_config("llama").save_pretrained(path)
    return path


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
