"""The CUDA path: Triton kernels inside the model, the sampler on GPU, an 8B-shaped model."""

from __future__ import annotations

import pytest
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.workers.models.loader import llama_8b_config, load_model
from pagedserve.workers.sampler import sample
from pagedserve.workers.sampling_batch import SamplingBatch
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_models import TINY_VARIANTS, hf_reference_logits

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# The Triton attention kernel may use TF32 tensor-core dots for fp32 inputs.
TRITON_FP32_TOLERANCE = 2e-3


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_triton_path_matches_transformers(variant, tiny_checkpoint):
    checkpoint = tiny_checkpoint(variant)
    generator = torch.Generator().manual_seed(0)
    sequences = {key: torch.randint(3, 256, (length,), generator=generator).tolist()
                 for key, length in (("a", 21), ("b", 9), ("c", 2))}
    expected = hf_reference_logits(checkpoint, sequences)
    runner = PagedRunner(load_model(checkpoint, dtype="float32", device="cuda"))
    prompt_lengths = {"a": 17, "b": 5, "c": 1}
    # Chunked: part of "a" first, then the rest with the other prompts, then decode steps.
    steps = [[("a", sequences["a"][:6])],
             [("b", sequences["b"][:5]), ("a", sequences["a"][6:17]), ("c", sequences["c"][:1])]]
    steps += [[(key, [sequences[key][prompt_lengths[key] + step]])
               for key in sequences if prompt_lengths[key] + step < len(sequences[key])]
              for step in range(4)]
    for chunks in steps:
        start = {key: runner.lengths.get(key, 0) for key, _ in chunks}
        for (key, tokens), logits in zip(chunks, runner.step(chunks), strict=True):
            reference = expected[key][start[key]:start[key] + len(tokens)]
            diff = (logits.cpu() - reference).abs().max().item()
            assert diff < TRITON_FP32_TOLERANCE, f"{key} from {start[key]}: {diff:.3g}"


def test_seeded_sampling_on_gpu_is_batch_independent():
    logits = torch.randn(4, 1000, device="cuda") * 3
    target = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    alone = sample(logits[1:2], SamplingBatch.from_requests([(target, [1], [2])], 1000, "cuda"))
    mixed = sample(logits, SamplingBatch.from_requests(
        [(SamplingParams(top_k=5), [1], []), (target, [1], [2]),
         (SamplingParams(temperature=0), [1], []), (SamplingParams(min_p=0.1, seed=1), [1], [])],
        1000, "cuda"))
    assert mixed.token_ids[1] == alone.token_ids[0]
    assert mixed.token_ids[2] == logits[2].argmax()


@torch.no_grad()
def test_llama_8b_shaped_dummy_model_runs():
    model = load_model(llama_8b_config(), dtype="auto", device="cuda", load_format="dummy")
    runner = PagedRunner(model, num_blocks=256, block_size=16)
    prompts = [("a", list(range(1000, 1300))), ("b", list(range(5, 70)))]
    prefill = runner.step(prompts)
    decode = runner.step([("a", [17]), ("b", [18])])
    for logits in [*prefill, *decode]:
        assert logits.dtype == torch.float32 and logits.shape[-1] == 128256
        assert torch.isfinite(logits).all()
