"""Keyword arguments map exactly onto GenerateRequest protos, as the fake gateway receives them."""

from __future__ import annotations

import pytest

from pagedserve.client import SAMPLING_FIELDS, Client
from pagedserve.errors import InvalidArgument, InvalidType
from pagedserve.protos.v1 import generation_pb2 as pb

ALL_SAMPLING = dict(
    n=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={5: 2.5, 9: -100.0}, seed=1234,
    max_tokens=32, min_tokens=4, stop=["\n", "END"], stop_token_ids=[2, 3],
    include_stop_str_in_output=True, ignore_eos=True, logprobs=5, prompt_logprobs=1,
    skip_special_tokens=False)


def test_every_sampling_field_is_covered():
    assert set(ALL_SAMPLING) == set(SAMPLING_FIELDS)
    assert set(SAMPLING_FIELDS) == set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def test_sampling_kwargs_map_to_proto_fields(server):
    with Client(server.address, model="tiny") as client:
        client.generate("Hello", request_id="r-1", priority=3, cache_salt="salt",
                        timeout=5, **ALL_SAMPLING)
    (call,) = server.servicer.calls
    expected = pb.GenerateRequest(
        request_id="r-1", model="tiny", text="Hello", priority=3, cache_salt="salt",
        sampling=pb.SamplingParams(
            n=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
            presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={5: 2.5, 9: -100.0},
            seed=1234, max_tokens=32, min_tokens=4, stop=["\n", "END"], stop_token_ids=[2, 3],
            include_stop_str_in_output=True, ignore_eos=True, logprobs=5, prompt_logprobs=1,
            skip_special_tokens=False))
    assert call.method == "Generate"
    assert call.request == expected


def test_defaults_leave_fields_unset(server):
    with Client(server.address) as client:
        client.generate([1, 2, 3])
        client.generate("x", temperature=None, seed=None, logprobs=None, stop="a")
    first, second = (c.request for c in server.servicer.calls)
    assert first == pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                       sampling=pb.SamplingParams())
    assert not first.sampling.HasField("temperature")
    assert not first.sampling.HasField("max_tokens")  # the server's default: 16
    assert first.request_id == "" and first.model == ""
    assert second.sampling == pb.SamplingParams(stop=["a"])
    assert not second.HasField("cache_salt")


def test_empty_token_prompt_is_still_a_token_prompt(server):
    with Client(server.address) as client:
        client.generate([])
    assert server.servicer.calls[0].request.WhichOneof("prompt") == "token_ids"


def test_beam_search_request(server):
    with Client(server.address) as client:
        client.beam_search([4, 5], beam_width=3, max_tokens=8, length_penalty=0.5,
                           request_id="b")
    (call,) = server.servicer.calls
    assert call.request == pb.GenerateRequest(
        request_id="b", token_ids=pb.TokenIds(ids=[4, 5]),
        beam_search=pb.BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5))
    assert not call.request.HasField("sampling")


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_unknown_keyword_raises_type_error_naming_it(method):
    client = Client("127.0.0.1:1")
    with pytest.raises(TypeError, match="'temprature'"):
        getattr(client, method)("hi", temprature=0.5)


def test_beam_search_refuses_sampling_keywords():
    with pytest.raises(TypeError, match="'temperature'"):
        Client("127.0.0.1:1").beam_search("hi", temperature=0.5)


@pytest.mark.parametrize(("kwargs", "error", "field"), [
    (dict(n=-1), InvalidArgument, "n"),
    (dict(temperature="hot"), InvalidType, "temperature"),
    (dict(stop_token_ids=[-3]), InvalidArgument, "stop_token_ids"),
    (dict(logit_bias={-1: 1.0}), InvalidArgument, "logit_bias"),
    (dict(logit_bias=[1, 2]), InvalidType, "logit_bias"),
    (dict(max_tokens=None), InvalidArgument, "max_tokens"),
])
def test_unrepresentable_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        Client("127.0.0.1:1").generate("hi", **kwargs)


@pytest.mark.parametrize("prompt", [b"bytes", 42, None, [1, "a"]])
def test_bad_prompts(prompt):
    with pytest.raises(InvalidArgument, match="prompt"):
        Client("127.0.0.1:1").generate(prompt)


def test_bad_timeout():
    with pytest.raises(InvalidArgument, match="timeout"):
        Client("127.0.0.1:1").generate("hi", timeout=0)


def test_small_rpcs(server):
    with Client(server.address, model="m") as client:
        assert client.tokenize("ab") == [97, 98]
        assert client.detokenize([104, 105], skip_special_tokens=False) == "hi"
        assert client.abort(["a", "b"]) == ["a"]
        info = client.model_info()
        load = client.load()
    requests = {c.method: c.request for c in server.servicer.calls}
    assert requests["Tokenize"] == pb.TokenizeRequest(model="m", text="ab")
    assert requests["Detokenize"] == pb.DetokenizeRequest(model="m", token_ids=[104, 105],
                                                          skip_special_tokens=False)
    assert requests["Abort"] == pb.AbortRequest(request_ids=["a", "b"])
    assert info.model == "m" and info.max_model_len == 2048 and info.eos_token_ids == [2]
    assert info.max_num_seqs == 8 and info.dtype == "bfloat16"
    assert load.num_running == 3 and load.kv_cache_usage == pytest.approx(0.1)
    assert load.num_replicas_up == 2
