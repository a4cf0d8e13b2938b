"""User-facing engine configuration (validated; errors name the field and the valid range)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagedserve.scheduler.config import (
    SCHEDULING_POLICIES,
    VALID_BLOCK_SIZES,
    ConfigError,
    check_field,
)
from pagedserve.validation import is_finite_number, is_int

DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
EXECUTOR_BACKENDS = ("auto", "local", "ray")
STEP_DISPATCHES = ("compiled_graph", "actor_call")
# The seed makes torch.Generator seeds (of sampling, and seed * 1_000_003 + rank for dummy
# weights), which must fit in 64 bits.
MAX_ENGINE_SEED = 2**32 - 1
# More intra-op threads than any machine has cores only adds thread start-up and barriers.
MAX_CPU_THREADS = 1024


@dataclass
class EngineConfig:
    """Everything needed to build an engine for one model replica."""

    model: str | None = None
    """HF checkpoint directory or a .gguf file; None uses the embedded default model."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model directory)."""
    dtype: str = "auto"
    """'auto' (the checkpoint's; float32 on CPU), 'float32', 'float16' or 'bfloat16'."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    load_format: str = "auto"
    """'auto' reads safetensors; 'dummy' makes random weights of the config's shapes."""
    seed: int = 0
    """Seed of unseeded sampling and of dummy weights, in [0, 2**32 - 1]."""
    tensor_parallel_size: int = 1
    """GPUs (ranks) one replica is split over; must divide the attention and KV heads."""
    distributed_executor_backend: str = "auto"
    """'auto' (Ray actors when tensor_parallel_size > 1, else this process), 'local' or 'ray'."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's max_position_embeddings, at most 8192."""
    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory for weights, activations and KV cache, in (0, 1]."""
    kv_cache_dtype: str = "auto"
    """'auto' (K/V stored in the model dtype) or 'fp8' (e4m3 with per-layer scales: half the
    bytes of bf16, so twice the blocks; needs a torch build with float8 dtypes)."""
    calculate_kv_scales: bool = False
    """fp8 KV only: for layers whose checkpoint has no k_scale/v_scale, compute them from the
    first prefill instead of using 1.0."""
    kv_cache_memory_gib: float | None = None
    """KV pool GiB per rank: the pool on CPU (default 0.25); overrides profiling on GPU."""
    num_gpu_blocks_override: int | None = None
    """Exact number of KV blocks (tests, benchmarks); overrides the memory-based sizing."""
    swap_space_gib: float = 0.0
    """CPU memory GiB per rank for swapped-out blocks; > 0 enables preemption by swapping."""
    max_num_seqs: int = 256
    """Most sequences per step."""
    max_num_batched_tokens: int | None = None
    """Token budget per step; default max(2048, max_model_len)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps within the token budget."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    scheduling_policy: str = "fcfs"
    """'fcfs' or 'priority'."""
    enforce_eager: bool = False
    """Disable CUDA graphs for decode steps."""
    async_scheduling: bool = True
    """Schedule step N+1 while step N runs (sampled ids stay on the device; beam search runs
    synchronous steps); False waits for every step's tokens before scheduling the next."""
    max_graph_batch_size: int = 256
    """Largest decode batch captured as a CUDA graph."""
    cpu_threads: int | None = None
    """Torch threads per worker (CPU default: OMP_NUM_THREADS, else half the cores, at most 4)."""
    step_dispatch: str = "compiled_graph"
    """How a step reaches Ray worker ranks: 'compiled_graph' (Ray Compiled Graph over shared
    memory; measured fastest, see bench/coordinator.py) or 'actor_call' (one task per rank)."""
    step_timeout_s: float = 300.0
    """A rank that takes longer than this for one step is declared failed (> 0 seconds)."""
    placement_wait_s: float | None = None
    """Seconds a replica's placement group may wait for its nodes (an autoscaling cluster adds
    GPU nodes in minutes: say 900); None: refused at once when the cluster lacks the GPUs (or
    CPUs), else 120 s for them to free up."""
    max_worker_restarts: int = 3
    """Times a served replica replaces its ranks after one dies or hangs (its requests are
    recomputed on the new ones); past that, or at 0, they end UNAVAILABLE."""

    def __post_init__(self) -> None:
        owner = "EngineConfig"
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            check_field(owner, name, value is None or isinstance(value, str | os.PathLike),
                        "None or a directory path", value)
        check_field(owner, "dtype", self.dtype in DTYPES, f"one of {DTYPES}", self.dtype)
        check_field(owner, "device", self.device in DEVICES, f"one of {DEVICES}", self.device)
        check_field(owner, "kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES,
                    f"one of {KV_CACHE_DTYPES}", self.kv_cache_dtype)
        check_field(owner, "load_format", self.load_format in LOAD_FORMATS,
                    f"one of {LOAD_FORMATS}", self.load_format)
        # is_int first: True == 1 and 16.0 == 16 would pass the membership test alone.
        check_field(owner, "block_size",
                    is_int(self.block_size) and self.block_size in VALID_BLOCK_SIZES,
                    f"one of {VALID_BLOCK_SIZES}", self.block_size)
        check_field(owner, "tensor_parallel_size",
                    is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
                    "an integer >= 1", self.tensor_parallel_size)
        check_field(owner, "distributed_executor_backend",
                    self.distributed_executor_backend in EXECUTOR_BACKENDS,
                    f"one of {EXECUTOR_BACKENDS}", self.distributed_executor_backend)
        check_field(owner, "gpu_memory_utilization",
                    is_finite_number(self.gpu_memory_utilization)
                    and 0 < self.gpu_memory_utilization <= 1,
                    "a number in (0, 1]", self.gpu_memory_utilization)
        # Finite, or sizing the pools (int(gib * 2**30)) overflows later.
        check_field(owner, "kv_cache_memory_gib", self.kv_cache_memory_gib is None
                    or (is_finite_number(self.kv_cache_memory_gib)
                        and self.kv_cache_memory_gib >= 0),
                    "None or a finite number >= 0", self.kv_cache_memory_gib)
        check_field(owner, "swap_space_gib",
                    is_finite_number(self.swap_space_gib) and self.swap_space_gib >= 0,
                    "a finite number >= 0", self.swap_space_gib)
        for name in ("num_gpu_blocks_override", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            check_field(owner, name, value is None or (is_int(value) and value >= 1),
                        "None or an integer >= 1", value)
        check_field(owner, "scheduling_policy", self.scheduling_policy in SCHEDULING_POLICIES,
                    f"one of {SCHEDULING_POLICIES}", self.scheduling_policy)
        check_field(owner, "seed", is_int(self.seed), "an integer", self.seed)
        check_field(owner, "seed", 0 <= self.seed <= MAX_ENGINE_SEED,
                    f"in [0, {MAX_ENGINE_SEED}]", self.seed)
        check_field(owner, "max_model_len", self.max_model_len is None
                    or self.max_model_len >= 2, "None or an integer >= 2", self.max_model_len)
        for name in ("enable_chunked_prefill", "enable_prefix_caching", "enforce_eager",
                     "async_scheduling", "calculate_kv_scales"):
            check_field(owner, name, isinstance(getattr(self, name), bool), "True or False",
                        getattr(self, name))
        check_field(owner, "max_worker_restarts",
                    is_int(self.max_worker_restarts) and self.max_worker_restarts >= 0,
                    "an integer >= 0", self.max_worker_restarts)
        for name in ("max_num_seqs", "max_graph_batch_size"):
            value = getattr(self, name)
            check_field(owner, name, is_int(value) and value >= 1, "an integer >= 1", value)
        check_field(owner, "cpu_threads", self.cpu_threads is None
                    or (is_int(self.cpu_threads) and 1 <= self.cpu_threads <= MAX_CPU_THREADS),
                    f"None or an integer in [1, {MAX_CPU_THREADS}]", self.cpu_threads)
        check_field(owner, "step_dispatch", self.step_dispatch in STEP_DISPATCHES,
                    f"one of {STEP_DISPATCHES}", self.step_dispatch)
        # Finite: Ray converts the timeout to integer milliseconds.
        check_field(owner, "placement_wait_s", self.placement_wait_s is None or (
            is_finite_number(self.placement_wait_s) and self.placement_wait_s > 0),
            "None or a finite number > 0", self.placement_wait_s)
        check_field(owner, "step_timeout_s",
                    is_finite_number(self.step_timeout_s) and self.step_timeout_s > 0,
                    "a finite number > 0", self.step_timeout_s)


__all__ = ["EngineConfig", "ConfigError"]
