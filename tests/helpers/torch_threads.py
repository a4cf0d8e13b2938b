"""One torch intra-op thread for a test module: the tiny models gain nothing from more, and the
threads spin badly on a busy 2-core machine (a 5x slowdown seen). Restored after the module so
other folders are unaffected. Import it into a conftest or module to use it (autouse)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
