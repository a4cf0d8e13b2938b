"""Served over the OpenAI HTTP API == offline: completions and chat completions through the
official `openai` client equal pagedserve.LLM (and LLM.chat) with the same EngineConfig, token
for token: text, token ids, finish and stop reasons, usage counts and logprobs, streamed
(chunks concatenated) and not.

The embedded tiny byte-level model is served (a tokenizer with a chat template), so text
prompts, chat templates and stop strings are covered.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import started_server
from tests.gateway.openai_utils import client, joined

pytestmark = pytest.mark.timeout(120)

LOGPROB_TOLERANCE = 1e-6
ENGINE_FIELDS = dict(device="cpu", num_gpu_blocks_override=128, max_model_len=256,
                     cpu_threads=1, seed=0)
TEXT_PROMPT = "The quick brown fox"
IDS_PROMPT = [40, 41, 42, 43, 44, 45, 46, 47]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a KV cache?"}]


@pytest.fixture(scope="module")
def offline(default_model_path):
    llm = LLM(model=default_model_path, **ENGINE_FIELDS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def served(aio, ray_cluster, default_model_path):
    config = EngineConfig(model=default_model_path, **ENGINE_FIELDS)
    with started_server(aio, config, ServeOptions(host="127.0.0.1", port=0,
                                                  http_port=0)) as server:
        yield server


@pytest.fixture(scope="module")
def api(served):
    with client(served) as openai_client:
        yield openai_client


def _offline(llm: LLM, prompt, **fields) -> Any:
    return llm.generate([prompt], SamplingParams(**fields), use_tqdm=False)[0]


def _served_both(api, served, extra_body: dict | None = None,
                 **request) -> tuple[Any, dict[int, dict[str, Any]], Any]:
    """(the whole response, the streamed choices joined, the stream's usage chunk), with
    token ids."""
    name = served.gateway.model_name
    extra_body = {"return_token_ids": True, **(extra_body or {})}
    whole = api.completions.create(model=name, extra_body=extra_body, **request)
    chunks = list(api.completions.create(model=name, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body=extra_body, **request))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return whole, joined(chunks[:-1]), chunks[-1].usage


CASES = {
    "text-greedy": (TEXT_PROMPT, dict(temperature=0.0, max_tokens=12)),
    "ids-greedy": (IDS_PROMPT, dict(temperature=0.0, max_tokens=10)),
    "sampled-n3-seeded": (TEXT_PROMPT, dict(temperature=0.9, top_p=0.9, seed=7, n=3,
                                            max_tokens=8)),
    "penalties": (IDS_PROMPT, dict(temperature=0.0, max_tokens=8, presence_penalty=0.5,
                                   frequency_penalty=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_completion_equals_offline(case, offline, served, api):
    prompt, fields = CASES[case]
    expected = _offline(offline, prompt, **fields)
    whole, streamed, stream_usage = _served_both(api, served, prompt=prompt, **fields)
    assert [c.index for c in whole.choices] == list(range(fields.get("n", 1)))
    for choice, completion in zip(whole.choices, expected.outputs, strict=True):
        assert choice.text == completion.text
        assert choice.token_ids == completion.token_ids
        assert choice.prompt_token_ids == expected.prompt_token_ids
        assert choice.finish_reason == completion.finish_reason == "length"
        assert choice.logprobs is None
        assert streamed[choice.index] == {"text": completion.text, "finishes": 1,
                                          "token_ids": completion.token_ids,
                                          "finish_reason": "length", "stop_reason": None}
    usage = {"prompt_tokens": len(expected.prompt_token_ids),
             "completion_tokens": expected.usage.completion_tokens,
             "total_tokens": len(expected.prompt_token_ids) + expected.usage.completion_tokens}
    assert whole.usage.model_dump(exclude_none=True) == usage
    assert stream_usage.model_dump(exclude_none=True) == usage


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_equals_offline(include, offline, served, api):
    free_run = _offline(offline, TEXT_PROMPT, temperature=0.0, max_tokens=16).outputs[0].text
    stop = free_run[5:7]
    fields = dict(temperature=0.0, max_tokens=16, stop=[stop],
                  include_stop_str_in_output=include)
    expected = _offline(offline, TEXT_PROMPT, **fields).outputs[0]
    assert expected.finish_reason == "stop" and expected.stop_reason == stop
    whole, streamed, _ = _served_both(
        api, served, prompt=TEXT_PROMPT, temperature=0.0, max_tokens=16, stop=[stop],
        extra_body={"include_stop_str_in_output": include})
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == (
        expected.text, "stop", stop)
    assert choice.text.endswith(stop) == include
    assert streamed[0]["text"] == expected.text
    assert (streamed[0]["finish_reason"], streamed[0]["stop_reason"]) == ("stop", stop)


def test_logprobs_equal_offline(offline, served, api):
    tokenizer = offline.get_tokenizer()
    expected = _offline(offline, IDS_PROMPT, temperature=0.0, max_tokens=6,
                        logprobs=2).outputs[0]
    name = served.gateway.model_name
    whole = api.completions.create(model=name, prompt=IDS_PROMPT, temperature=0.0,
                                   max_tokens=6, logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([e.token_id]) for e in expected.logprobs]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs],
                                                    abs=LOGPROB_TOLERANCE)
    for served_top, entry in zip(logprobs.top_logprobs, expected.logprobs, strict=True):
        assert served_top == pytest.approx(
            {tokenizer.decode([token_id]): value for token_id, value in entry.top},
            abs=LOGPROB_TOLERANCE)
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets
    chat = api.chat.completions.create(model=name, messages=CONVERSATION, temperature=0.0,
                                       max_tokens=4, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content


@pytest.mark.parametrize("fields", [dict(temperature=0.0, max_tokens=10),
                                    dict(temperature=0.8, seed=5, n=2, max_tokens=6)],
                         ids=["greedy", "sampled-n2"])
def test_chat_equals_offline_chat(fields, offline, served, api):
    expected = offline.chat(CONVERSATION, SamplingParams(**fields), use_tqdm=False)[0]
    name = served.gateway.model_name
    whole = api.chat.completions.create(model=name, messages=CONVERSATION,
                                        extra_body={"return_token_ids": True}, **fields)
    assert whole.prompt_token_ids == expected.prompt_token_ids
    chunks = list(api.chat.completions.create(model=name, messages=CONVERSATION, stream=True,
                                              **fields))
    assert [c.delta.role for c in chunks[0].choices] == ["assistant"] * fields.get("n", 1)
    streamed = joined(chunks)
    for choice, completion in zip(whole.choices, expected.outputs, strict=True):
        assert (choice.message.role, choice.message.content) == ("assistant", completion.text)
        assert choice.token_ids == completion.token_ids
        assert choice.finish_reason == completion.finish_reason == "length"
        assert streamed[choice.index]["text"] == completion.text
        assert streamed[choice.index]["finish_reason"] == "length"
    assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert whole.usage.completion_tokens == expected.usage.completion_tokens


def test_prompt_list_is_one_request_each(offline, served, api):
    prompts = [TEXT_PROMPT, "Continuous batching"]
    fields = dict(temperature=0.0, max_tokens=5, n=2)
    expected = offline.generate(prompts, SamplingParams(**fields), use_tqdm=False)
    whole = api.completions.create(model=served.gateway.model_name, prompt=prompts, **fields)
    texts = {choice.index: choice.text for choice in whole.choices}
    assert texts == {p * 2 + c.index: c.text for p, output in enumerate(expected)
                     for c in output.outputs}
    assert whole.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert whole.usage.completion_tokens == 4 * 5


def test_http_equals_grpc(aio, served, api):
    """The two fronts share one path: the same request gives the same tokens."""
    async def over_grpc() -> pb.GenerateResponse:
        async with grpc.aio.insecure_channel(served.address) as channel:
            return await generation_pb2_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text=TEXT_PROMPT, sampling=pb.SamplingParams(
                    temperature=0.0, max_tokens=9)), timeout=60)

    expected = aio.run(over_grpc(), timeout=70).completions[0]
    whole = api.completions.create(model=served.gateway.model_name, prompt=TEXT_PROMPT,
                                   temperature=0.0, max_tokens=9,
                                   extra_body={"return_token_ids": True})
    assert (whole.choices[0].text, whole.choices[0].token_ids) == (
        expected.text, list(expected.token_ids))
