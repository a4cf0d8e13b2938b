"""PromptTokenizer: long texts are encoded off the loop, at most max_threads at a time, and a
cancelled caller frees nothing early and leaves nothing queued."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pagedserve.cluster.gateway_request import GatewayRequest
from pagedserve.cluster.prompt_tokenizer import PromptTokenizer
from pagedserve.engine.processor import Processor
from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)


class CountingTokenizer:
    """Encodes one id per character, noting the thread; `gate` holds every encoding."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.append(threading.current_thread().name)
        try:
            assert self.gate.wait(20)
            return [ord(c) % 250 for c in text]
        finally:
            with self._lock:
                self.running -= 1


def test_short_texts_in_place_long_ones_on_the_pool():
    tokenizer = CountingTokenizer()
    prompts = PromptTokenizer(Processor(tokenizer), inline_chars=4)

    async def both():
        short = await prompts.make_request("a", GatewayRequest("abcd", SamplingParams()), 1.0)
        long = await prompts.make_request("b", GatewayRequest("abcde", SamplingParams()), 2.0)
        return short, long, await prompts.encode("x" * 9)

    short, long, ids = asyncio.run(both())
    prompts.close()
    assert short.prompt_token_ids == [97, 98, 99, 100] and short.arrival_time == 1.0
    assert long.prompt_token_ids == [97, 98, 99, 100, 101] and long.request_id == "b"
    assert ids == [120] * 9
    assert tokenizer.threads[0] == threading.main_thread().name
    assert all(name.startswith("gateway-tokenize") for name in tokenizer.threads[1:])


def test_at_most_max_threads_and_a_cancelled_wait_leaves_nothing():
    tokenizer = CountingTokenizer()
    tokenizer.gate.clear()
    prompts = PromptTokenizer(Processor(tokenizer), max_threads=2, inline_chars=0)

    async def run():
        calls = [asyncio.ensure_future(prompts.encode(f"text {i}")) for i in range(5)]
        await asyncio.sleep(0.2)
        assert tokenizer.running == 2  # the other three wait on the loop
        calls[4].cancel()  # a waiter: never reaches a thread
        calls[0].cancel()  # a running one: its slot stays taken until its thread ends
        await asyncio.sleep(0.2)
        assert tokenizer.running == 2 and len(tokenizer.threads) == 2
        tokenizer.gate.set()
        done = await asyncio.gather(*calls, return_exceptions=True)
        return done

    done = asyncio.run(run())
    prompts.close()
    assert isinstance(done[0], asyncio.CancelledError)
    assert isinstance(done[4], asyncio.CancelledError)
    assert done[1:4] == [[ord(c) % 250 for c in f"text {i}"] for i in (1, 2, 3)]
    assert tokenizer.most_at_once == 2
    assert len(tokenizer.threads) == 4, "the cancelled waiter was never encoded"


def test_refusals_come_back_from_the_pool():
    prompts = PromptTokenizer(Processor(None), inline_chars=0)
    with pytest.raises(InvalidArgument) as raised:
        asyncio.run(prompts.encode("no tokenizer"))
    prompts.close()
    assert raised.value.field == "prompt"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_threads": 0}, "PromptTokenizer.max_threads must be an integer >= 1, got 0"),
    ({"inline_chars": -1}, "PromptTokenizer.inline_chars must be an integer >= 0, got -1"),
    ({"max_threads": True}, "PromptTokenizer.max_threads must be an integer >= 1, got True"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument) as raised:
        PromptTokenizer(Processor(None), **kwargs)
    assert str(raised.value) == message
