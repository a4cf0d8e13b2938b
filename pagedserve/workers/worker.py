"""One tensor-parallel rank: its model shard, its shard of the paged KV pool, its model runner.

Every rank holds the same block ids for its own KV heads, so one scheduler and one set of block
tables serve them all: each step every rank receives the same `SchedulerOutput`, runs its shard
(row-parallel outputs are all-reduced), and rank 0 samples. The engine core drives ranks through an
executor (`pagedserve.executor`): in-process for one rank, Ray actors otherwise. A worker
is built in two phases so that an executor can ask rank 0 for a rendezvous address before any
rank joins the process group.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.errors import ResourceExhausted
from pagedserve.scheduler.output import SchedulerOutput, StepResult
from pagedserve.workers.host_resources import available_host_memory, choose_cpu_threads
from pagedserve.workers.kv_pool import (
    allocate_kv_cache_for_config,
    bytes_per_block,
    kv_cache_torch_dtype,
    kv_dtype_name,
)
from pagedserve.workers.kv_scales import prepare_kv_scales
from pagedserve.workers.layers.linear import pack_weights_for_cpu
from pagedserve.workers.layers.parallel import init_tensor_parallel
from pagedserve.workers.model_runner import ModelRunner
from pagedserve.workers.models.loader import (
    eos_token_ids,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from pagedserve.workers.profiling import GIB, profile_kv_cache_bytes

DEFAULT_CPU_KV_GIB = 0.25

logger = logging.getLogger(__name__)


def model_dtype(config: EngineConfig, hf_config: Any, device_type: str) -> torch.dtype:
    """The dtype every rank runs in: 'auto' is the checkpoint's dtype, except float32 on CPU."""
    name = config.dtype
    if name == "auto" and device_type == "cpu":
        name = "float32"
    return resolve_dtype(name, hf_config)


class Worker:
    """Rank `rank` of `world_size`; call `load`, then `init_cache`, then `execute` per step."""

    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        device_type: str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.model_dir = model_dir
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device_type)
        self.hf_config = load_config(model_dir)
        self.dtype = model_dtype(config, self.hf_config, device_type)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.block_bytes = bytes_per_block(
            self.hf_config, config.block_size, self.kv_dtype, tp_size=world_size
        )
        self.model: torch.nn.Module | None = None
        self.runner: ModelRunner | None = None
        self._store = None  # rank 0's rendezvous store (kept alive while the group exists)
        # The CPU model path runs on torch's intra-op threads; a GPU worker's host side is
        # light, so its threads change only when cpu_threads asks for it.
        if self.device.type == "cpu" or config.cpu_threads is not None:
            threads, source = choose_cpu_threads(config.cpu_threads)
            torch.set_num_threads(threads)
            logger.info("rank %d: %d torch CPU threads (%s)", rank, threads, source)

    def open_rendezvous(self) -> tuple[str, int]:
        """On rank 0: start the store the ranks meet at, on a port the OS picks (no window in
        which another process could take it); returns (host, port) for the other ranks."""
        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True,
                                    wait_for_workers=False)
        return host, self._store.port

    def load(self, rendezvous: tuple[str, int] | None) -> None:
        """Join the tensor-parallel group (NCCL on GPU, gloo on CPU) at `rendezvous` (from rank
        0's `open_rendezvous`; None for a single rank) and load this rank's shard."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            # A Ray GPU actor sees only its own GPU; in-process, the caller's current device.
            self.device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        store = None
        if self.world_size > 1:
            store = self._store if self.rank == 0 else dist.TCPStore(
                *rendezvous, self.world_size, is_master=False)
        tp = init_tensor_parallel(self.rank, self.world_size, backend=backend, store=store)
        config = self.config
        source = self.hf_config if config.load_format == "dummy" else self.model_dir
        self.model = load_model(
            source,
            dtype=self.dtype,
            device=self.device,
            tp_rank=tp.rank,
            tp_size=tp.size,
            load_format=config.load_format,
            seed=config.seed,
        )
        self.model.eval()
        if self.device.type == "cpu":
            packed = pack_weights_for_cpu(self.model)
            logger.info("rank %d: %.2f GiB of weights prepacked for CPU matmuls", self.rank,
                        packed / GIB)

    def describe(self) -> dict[str, Any]:
        """What the engine core needs to know of this rank's model, as plain data."""
        return {
            "vocab_size": self.hf_config.vocab_size,
            "max_position_embeddings": getattr(self.hf_config, "max_position_embeddings", 8192),
            "block_bytes": self.block_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": kv_dtype_name(self.kv_dtype),
            "device": self.device.type,
            "eos_token_ids": eos_token_ids(
                self.hf_config, load_tokenizer(self.config.tokenizer or self.model_dir),
                self.model_dir),
        }

    def num_gpu_blocks(self, max_num_batched_tokens: int) -> int:
        """KV blocks this rank can hold (profiled on GPU; configured size on CPU)."""
        config = self.config
        if config.num_gpu_blocks_override is not None:
            return config.num_gpu_blocks_override
        if config.kv_cache_memory_gib is not None:
            kv_bytes = int(config.kv_cache_memory_gib * GIB)
        elif self.device.type == "cuda":
            kv_bytes = profile_kv_cache_bytes(
                self.model,
                self.hf_config,
                self.kv_dtype,
                self.device,
                max_num_batched_tokens,
                config.max_num_seqs,
                config.block_size,
                config.gpu_memory_utilization,
                tp_size=self.world_size,
            )
        else:
            kv_bytes = int(DEFAULT_CPU_KV_GIB * GIB)
        return kv_bytes // self.block_bytes

    def num_cpu_blocks(self) -> int:
        """Swap blocks that fit in `swap_space_gib` of host memory (per rank, like the KV pool:
        a rank's block holds only its own KV heads)."""
        return int(self.config.swap_space_gib * GIB) // self.block_bytes

    def init_cache(
        self,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        """Allocate the KV pool (and the CPU swap pool) and build the model runner; raises
        ResourceExhausted, naming the field that sized it, for a pool that does not fit."""
        config = self.config
        self.check_pools_fit(num_gpu_blocks, num_cpu_blocks)
        kv_caches = allocate_kv_cache_for_config(
            self.hf_config,
            num_gpu_blocks,
            config.block_size,
            self.kv_dtype,
            self.device,
            tp_size=self.world_size,
        )
        cpu_caches = None
        if num_cpu_blocks:
            cpu_caches = allocate_kv_cache_for_config(
                self.hf_config,
                num_cpu_blocks,
                config.block_size,
                self.kv_dtype,
                "cpu",
                tp_size=self.world_size,
            )
            if self.device.type == "cuda":
                cpu_caches = [(k.pin_memory(), v.pin_memory()) for k, v in cpu_caches]
        graph_batch = 0 if config.enforce_eager else min(config.max_graph_batch_size,
                                                         config.max_num_seqs)
        self.runner = ModelRunner(
            self.model,
            kv_caches,
            config.block_size,
            max_model_len,
            cpu_caches,
            eos_token_ids,
            config.seed,
            cuda_graph_max_batch=graph_batch,
        )
        prepare_kv_scales(self.model, config.kv_cache_dtype, config.calculate_kv_scales)

    def _kv_pool_size_field(self) -> str | None:
        """The EngineConfig field that sized this rank's KV pool; None when profiling did (that
        size already fits the free GPU memory)."""
        if self.config.num_gpu_blocks_override is not None:
            return "num_gpu_blocks_override"
        if self.config.kv_cache_memory_gib is not None or self.device.type == "cpu":
            return "kv_cache_memory_gib"
        return None

    def check_pools_fit(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Raise ResourceExhausted, before allocating, for a pool larger than the memory left:
        the KV pool in free GPU memory (host memory on CPU), the swap pool in host memory."""
        kv_bytes = num_gpu_blocks * self.block_bytes
        kv_field = self._kv_pool_size_field()
        host = available_host_memory()
        if self.device.type == "cuda":
            if kv_field is not None:
                free, _ = torch.cuda.mem_get_info(self.device)
                self._check_fits(kv_field, "the KV pool", kv_bytes, free, "free GPU memory",
                                 "or leave kv_cache_memory_gib and num_gpu_blocks_override None "
                                 "to size the pool from gpu_memory_utilization")
        elif host is not None:
            self._check_fits(kv_field, "the KV pool", kv_bytes, host, "available host memory",
                             "or free host memory")
            host -= kv_bytes  # on CPU both pools take host memory
        if num_cpu_blocks and host is not None:
            self._check_fits("swap_space_gib", "the swap pool", num_cpu_blocks * self.block_bytes,
                             host, "available host memory",
                             "or set it to 0 to preempt by recomputation")

    def _check_fits(self, field: str, pool: str, requested: int, available: int, where: str,
                    advice: str) -> None:
        if requested > available:
            value = getattr(self.config, field)
            default = f" ({DEFAULT_CPU_KV_GIB} GiB on CPU)" if value is None else ""
            raise ResourceExhausted(
                f"EngineConfig.{field}={value}{default} asks for {requested / GIB:.2f} GiB for "
                f"{pool} of rank {self.rank}, but only {max(available, 0) / GIB:.2f} GiB of "
                f"{where} is left; lower {field}, {advice}")

    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs on this rank."""
        return self.runner is not None and self.runner.graphs is not None

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        """Run one scheduler step on this rank; the results of the steps it finished (see
        `ModelRunner.execute`; meaningful on rank 0 only). The last carries this call's wall
        time on this rank, so callers can tell their dispatch overhead from the model's time."""
        start = time.perf_counter()
        results = self.runner.execute(step)
        if results:
            results[-1].execute_seconds = time.perf_counter() - start
        return results

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
