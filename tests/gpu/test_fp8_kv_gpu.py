"""FP8 KV cache on a CUDA device (skipped without one; e4m3 conversions need sm89+): the write
kernel's bytes against the torch reference on arbitrary values (rounding included, which the
interpreter cannot check), attention over fp8 blocks against the float64 oracle on the
fp8-rounded K/V at real head shapes, CUDA-graph capture with scales changed after capture, and
copies/swaps that keep the bytes."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.block_ops import swap_blocks
from pagedserve.kernels.cache_ops import write_kv, write_kv_reference
from pagedserve.kernels.kv_quant import quantize_kv
from pagedserve.kernels.paged_attention import paged_attention, paged_attention_reference
from tests.kernels._batches import make_batch, naive_dense_attention, relative_error
from tests.kernels._fp8 import quantize_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA device with e4m3 conversions (sm89+)"),
]
F8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_write_kv_stores_the_reference_bytes(dtype):
    num_blocks, block_size, heads, dim, tokens = 300, 16, 8, 128, 1000
    qkv = (torch.randn(tokens, 48, dim, device="cuda") * 3).to(dtype)
    qkv[:7, 32] = 1e4  # saturates
    key, value = qkv[:, 32:40], qkv[:, 40:]
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::7] = -1
    k_scale = torch.tensor([3 * 4.2 / 448], device="cuda")
    v_scale = torch.tensor([0.0173], device="cuda")  # not a power of two: rounding matters
    caches = [torch.full((num_blocks, block_size, heads, dim), float("nan"),
                         device="cuda").to(F8) for _ in range(4)]
    write_kv(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    write_kv_reference(key, value, caches[2], caches[3], slots, k_scale, v_scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))


@pytest.mark.parametrize(
    ("dtype", "num_q_heads", "num_kv_heads", "head_dim", "block_size", "sliding_window"),
    [
        (torch.bfloat16, 32, 8, 128, 16, None),  # Llama-3-8B
        (torch.bfloat16, 32, 4, 128, 16, None),  # Llama-3-70B, TP=2 shard
        (torch.bfloat16, 32, 8, 128, 128, None),
        (torch.bfloat16, 10, 2, 80, 16, None),
        (torch.bfloat16, 8, 2, 256, 16, None),
        (torch.bfloat16, 32, 8, 128, 16, 100),  # sliding window
        (torch.float16, 40, 8, 128, 16, None),
    ],
)
def test_attention_over_fp8_matches_the_fp8_rounded_oracle(
    dtype, num_q_heads, num_kv_heads, head_dim, block_size, sliding_window
):
    batch = make_batch([1, 1, 37, 1, 300, 1], [1, 700, 37, 2049, 900, 64],
                       num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, device="cuda", seed=head_dim)
    fp8 = quantize_batch(batch, key_range=0.8)
    oracle = naive_dense_attention(fp8.batch, sliding_window)
    for splits in (None, 1, 4):
        out = torch.full_like(batch.query, float("nan"))
        paged_attention(*fp8.args(), **fp8.kwargs(), out=out, sliding_window=sliding_window,
                        num_kv_splits=splits)
        assert relative_error(out, oracle) < 1.5e-2
    reference = paged_attention_reference(*fp8.args(), **fp8.kwargs(),
                                          sliding_window=sliding_window)
    assert relative_error(reference, oracle) < 1e-2


def test_fp8_decode_capture_reads_scales_at_replay():
    batch = make_batch([1] * 8, [1000, 20, 4000, 77, 1, 513, 2048, 9], num_q_heads=32,
                       num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
                       device="cuda")
    fp8 = quantize_batch(batch)
    out = torch.empty_like(batch.query)
    kwargs = dict(fp8.kwargs(), max_query_len=1, max_seq_len=4000, num_kv_splits=4)
    paged_attention(*fp8.args(), **kwargs, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*fp8.args(), **kwargs, out=out)
    # Scales changed in place after capture (as calibration does): the replay must use them.
    fp8.k_scale.mul_(0.5)
    fp8.v_scale.mul_(2.0)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = paged_attention_reference(*fp8.args(), **fp8.kwargs())
    assert relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_swap_keeps_fp8_bytes(direction):
    shape = (64, 16, 8, 128)
    gpu = [quantize_kv(torch.randn(shape, device="cuda") * 100, torch.ones(1, device="cuda"))
           for _ in range(4)]
    cpu = [torch.zeros(shape).to(F8).pin_memory() for _ in range(4)]
    src, dst = (gpu, cpu) if direction == "gpu_to_cpu" else (cpu, gpu)
    if direction == "cpu_to_gpu":
        for cache in cpu:
            cache.view(torch.uint8).copy_(torch.randint(0, 256, shape, dtype=torch.uint8))
    mapping = torch.tensor([[3, 60], [10, 0], [63, 5]])
    swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    for source, target in zip(src, dst, strict=True):
        for s, d in mapping.tolist():
            assert torch.equal(target[d].view(torch.uint8).cpu(),
                               source[s].view(torch.uint8).cpu())


def test_engine_with_fp8_kv_tracks_the_bf16_kv_engine(tmp_path):
    # The tiny model end to end on the GPU: Triton write and attention, decode CUDA graphs
    # captured before the first prefill calibrates the scales they read.
    from pagedserve.llm import LLM
    from pagedserve.sampling_params import SamplingParams
    from tests.engine.engine_utils import make_prompts
    from tests.helpers.tiny_models import save_tiny_checkpoint

    checkpoint = str(save_tiny_checkpoint(tmp_path, "llama"))
    prompts = make_prompts((1, 3, 8, 17, 29, 40, 5, 12, 33, 21, 9, 26, 50, 60, 7, 44), seed=1)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    forced = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    runs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(model=checkpoint, device="cuda", dtype="bfloat16", block_size=16,
                  kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=True,
                  kv_cache_memory_gib=1.0)  # fixed: the first engine's freed memory stays cached
        assert llm.engine.executor.worker.uses_cuda_graphs()
        # Greedy first: its prefill calibrates, its decode steps replay the graphs.
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        reference = runs["auto"][0] if runs else tokens
        outputs = llm.generate([p + list(t) for p, t in zip(prompts, reference, strict=True)],
                               forced, use_tqdm=False)
        runs[kv_cache_dtype] = (tokens, [
            (entry.logprob, entry.top[0][0]) for o, p in zip(outputs, prompts, strict=True)
            for entry in o.prompt_logprobs[len(p):]])
        assert llm.engine.model_info()["kv_cache_dtype"] == (
            "float8_e4m3fn" if kv_cache_dtype == "fp8" else "bfloat16")
        llm.shutdown()
    first_tokens = [(a[0], b[0]) for a, b in zip(runs["fp8"][0], runs["auto"][0], strict=True)]
    assert sum(a == b for a, b in first_tokens) >= 12
    pairs = list(zip(runs["fp8"][1], runs["auto"][1], strict=True))
    assert sum(a[1] == b[1] for a, b in pairs) / len(pairs) >= 0.8
    assert sum(abs(a[0] - b[0]) for a, b in pairs) / len(pairs) <= 0.1
