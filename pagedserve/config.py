"""User-facing engine configuration (validated; errors name the field and the valid range)."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.scheduler.config import (
    SCHEDULING_POLICIES,
    VALID_BLOCK_SIZES,
    ConfigError,
    check_field,
)

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
EXECUTOR_BACKENDS = ("auto", "local", "ray")


@dataclass
class EngineConfig:
    """Everything needed to build an engine for one model replica."""

    model: str | None = None
    """HF checkpoint directory; None uses the embedded default model."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model directory)."""
    dtype: str = "auto"
    """'auto' (the checkpoint's; float32 on CPU), 'float32', 'float16' or 'bfloat16'."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    load_format: str = "auto"
    """'auto' reads safetensors; 'dummy' makes random weights of the config's shapes."""
    seed: int = 0
    """Seed of unseeded sampling and of dummy weights."""
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
    kv_cache_memory_gib: float | None = None
    """KV pool GiB per rank: the pool on CPU (default 0.25); overrides profiling on GPU."""
    num_gpu_blocks_override: int | None = None
    """Exact number of KV blocks (tests, benchmarks); overrides the memory-based sizing."""
    swap_space_gib: float = 0.0
    """CPU memory per rank for swapped-out blocks; > 0 enables preemption by swapping."""
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
    max_graph_batch_size: int = 256
    """Largest decode batch captured as a CUDA graph."""
    step_timeout_s: float = 300.0
    """A rank that takes longer than this for one step is declared failed (> 0 seconds)."""

    def __post_init__(self) -> None:
        owner = "EngineConfig"
        check_field(owner, "dtype", self.dtype in DTYPES, f"one of {DTYPES}", self.dtype)
        check_field(owner, "device", self.device in DEVICES, f"one of {DEVICES}", self.device)
        check_field(owner, "load_format", self.load_format in LOAD_FORMATS,
                    f"one of {LOAD_FORMATS}", self.load_format)
        check_field(owner, "block_size", self.block_size in VALID_BLOCK_SIZES,
                    f"one of {VALID_BLOCK_SIZES}", self.block_size)
        check_field(owner, "tensor_parallel_size",
                    isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                    "an integer >= 1", self.tensor_parallel_size)
        check_field(owner, "distributed_executor_backend",
                    self.distributed_executor_backend in EXECUTOR_BACKENDS,
                    f"one of {EXECUTOR_BACKENDS}", self.distributed_executor_backend)
        check_field(owner, "gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1,
                    "in (0, 1]", self.gpu_memory_utilization)
        for name in ("kv_cache_memory_gib", "swap_space_gib"):
            value = getattr(self, name)
            check_field(owner, name, value is None or value >= 0, ">= 0", value)
        for name in ("num_gpu_blocks_override", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            check_field(owner, name, value is None or (isinstance(value, int) and value >= 1),
                        "None or an integer >= 1", value)
        check_field(owner, "scheduling_policy", self.scheduling_policy in SCHEDULING_POLICIES,
                    f"one of {SCHEDULING_POLICIES}", self.scheduling_policy)
        check_field(owner, "seed", isinstance(self.seed, int) and not isinstance(self.seed, bool),
                    "an integer", self.seed)
        check_field(owner, "max_model_len", self.max_model_len is None
                    or self.max_model_len >= 2, "None or an integer >= 2", self.max_model_len)
        for name in ("enable_chunked_prefill", "enable_prefix_caching", "enforce_eager"):
            check_field(owner, name, isinstance(getattr(self, name), bool), "True or False",
                        getattr(self, name))
        check_field(owner, "max_num_seqs", isinstance(self.max_num_seqs, int)
                    and self.max_num_seqs >= 1, "an integer >= 1", self.max_num_seqs)
        check_field(owner, "step_timeout_s", isinstance(self.step_timeout_s, int | float)
                    and not isinstance(self.step_timeout_s, bool) and self.step_timeout_s > 0
                    and self.step_timeout_s != float("inf"), "a finite number > 0",
                    self.step_timeout_s)
        check_field(owner, "max_graph_batch_size", isinstance(self.max_graph_batch_size, int)
                    and self.max_graph_batch_size >= 1, "an integer >= 1",
                    self.max_graph_batch_size)


__all__ = ["EngineConfig", "ConfigError"]
