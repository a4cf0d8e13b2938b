"""Helpers shared by the engine tests: HF references, a step spy, leak checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams

VOCAB = 256  # tests/helpers/tiny_models.TINY_SHAPE
PROMPT_LENGTHS = (1, 3, 8, 17, 29, 40)
MAX_TOKENS = 12


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0, low: int = 3) -> list[list[int]]:
    """Random token-id prompts (ids >= 3: no pad / bos / eos) of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def make_llm(checkpoint: Path | str, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    return LLM(model=str(checkpoint), device="cpu", dtype="float32", **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def assert_no_leaks(llm: LLM) -> None:
    """Every KV block is back in the pool and nothing is left in the engine's bookkeeping."""
    engine = llm.engine
    scheduler = engine.scheduler
    kv = scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_blocks, (
        f"{kv.pool.num_blocks - kv.num_free_blocks} KV blocks still referenced")
    assert not kv.block_tables
    assert not kv.cpu_block_tables
    if kv.cpu_pool is not None:
        assert kv.cpu_pool.num_free_blocks == kv.cpu_pool.num_blocks
    assert not scheduler.requests
    assert not scheduler.running and not scheduler.swapped and not scheduler.waiting
    assert not engine.has_unfinished_requests()


@dataclass
class StepLog:
    """What the scheduler handed to the runner, summed over the steps seen."""

    steps: int = 0
    swap_out: int = 0
    swap_in: int = 0
    copies: int = 0
    max_tokens_per_step: int = 0
    max_prefill_chunk: int = 0
    max_ref_count: int = 0
    new_requests: list[str] = field(default_factory=list)


class StepSpy:
    """Wraps an engine's runner.execute to record block moves and batch shapes."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.log = StepLog()

    def __enter__(self) -> StepLog:
        runner = self.llm.engine.executor
        pool = self.llm.engine.scheduler.kv.pool
        original = runner.execute
        log = self.log

        def execute(step):
            log.steps += 1
            log.swap_out += len(step.blocks_to_swap_out)
            log.swap_in += len(step.blocks_to_swap_in)
            log.copies += len(step.blocks_to_copy)
            log.max_tokens_per_step = max(log.max_tokens_per_step, step.num_batched_tokens)
            log.max_ref_count = max([log.max_ref_count, *pool.ref_counts])
            for item in step.scheduled:
                if item.num_tokens > 1:
                    log.max_prefill_chunk = max(log.max_prefill_chunk, item.num_tokens)
                if item.new_request is not None:
                    log.new_requests.append(item.request_id)
            return original(step)

        runner.execute = execute
        self._original = original
        return log

    def __exit__(self, *exc) -> None:
        del self.llm.engine.executor.execute  # back to the class attribute's bound method


class HFReference:
    """Transformers models of the tiny checkpoints, with greedy generation and logprobs."""

    def __init__(self) -> None:
        self._models: dict[str, torch.nn.Module] = {}
        self._greedy: dict[tuple, list[int]] = {}

    def model(self, checkpoint: Path | str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        key = str(checkpoint)
        if key not in self._models:
            self._models[key] = AutoModelForCausalLM.from_pretrained(
                key, dtype=torch.float32).eval()
        return self._models[key]

    @torch.no_grad()
    def generate(self, checkpoint: Path | str, prompt: list[int], max_tokens: int) -> list[int]:
        """HF greedy `generate` for one unpadded prompt, EOS never stopping it."""
        key = (str(checkpoint), tuple(prompt), max_tokens)
        if key not in self._greedy:
            out = self.model(checkpoint).generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                eos_token_id=None, pad_token_id=0, num_beams=1, temperature=None, top_p=None,
                top_k=None)
            self._greedy[key] = out[0, len(prompt):].tolist()
        return self._greedy[key]

    def generate_all(self, checkpoint, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
        return [self.generate(checkpoint, p, max_tokens) for p in prompts]

    @torch.no_grad()
    def log_softmax(self, checkpoint: Path | str, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] log-probabilities of the next token at every position."""
        logits = self.model(checkpoint)(torch.tensor([tokens])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)
