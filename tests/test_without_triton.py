"""pagedserve runs without Triton (pyproject installs it only on Linux x86_64): in a subprocess
where `import triton` fails, the package imports, every kernel module imports with only its
torch code defined, a Triton wrapper raises a clear error, and a tiny model generates on CPU
exactly what it generates here, with Triton importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 13, 2, 77], [3] * 11, list(range(20, 60))]
KERNEL_MODULES = ["activation", "block_ops", "cache_ops", "paged_attention", "rms_norm", "rotary"]

# `sys.modules[name] = None` makes every `import name` (and of its submodules) raise ImportError,
# as if it were not installed.
CHILD = """
import json, sys
sys.modules["triton"] = None
import pagedserve
from pagedserve import LLM, SamplingParams
from pagedserve.kernels import checks
modules = {}
for name in MODULES:
    module = __import__(f"pagedserve.kernels.{name}", fromlist=["_"])
    modules[name] = sorted(n for n in vars(module) if n.endswith("_kernel"))
from pagedserve.kernels.rms_norm import rms_norm
import torch
try:
    rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    error = None
except RuntimeError as exc:
    error = str(exc)
llm = LLM(model=MODEL, device="cpu", dtype="float32", block_size=4)
outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)
real = [name for name, module in sys.modules.items()
        if module is not None and (name == "triton" or name.startswith("triton."))]
print(json.dumps({"has_triton": checks.HAS_TRITON, "kernels": modules, "error": error,
                  "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                  "triton_modules": real}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Mistral's sliding window and GQA exercise more of the CPU attention path.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("no-triton"), "mistral")


def test_generation_without_triton(model_dir):
    from pagedserve import LLM, SamplingParams

    script = (f"MODULES = {KERNEL_MODULES!r}\nMODEL = {str(model_dir)!r}\nPROMPTS = {PROMPTS!r}\n"
              + CHILD)
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["has_triton"] is False
    assert result["triton_modules"] == []
    assert all(kernels == [] for kernels in result["kernels"].values()), result["kernels"]
    assert result["error"] and "Triton is not installed" in result["error"]
    assert "rms_norm_reference" in result["error"]

    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", block_size=4)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)
    assert result["tokens"] == [list(o.outputs[0].token_ids) for o in expected]
    assert all(len(tokens) == 12 for tokens in result["tokens"])
