"""Hypothesis strategies for every public request: the pagedserve.v1 messages (GenerateRequest
with its SamplingParams / BeamSearchParams / TokenIds, TokenizeRequest, DetokenizeRequest,
AbortRequest, GetModelInfoRequest) and the OpenAI HTTP bodies (/v1/completions,
/v1/chat/completions).

Values lean on the edges: each scalar is a type's extremes, the boundaries of its valid range,
a plain valid value, or anything of its type (NaN and infinities for doubles); strings include
the empty one, '/', control and combining characters, emoji and long ones (lone surrogates
only where a string can carry them: JSON, never a proto string); repeated fields are short
random lists or one value repeated up to 100,000 times; oneofs and optional fields are set or
not at random. The HTTP bodies take each known field with a value of its type or of any other
JSON type, plus unknown fields and nested junk.

`small=True` keeps every request that could be valid short to run (max_tokens <= 4, short
prompts), for the end-to-end layer, whose requests really generate.
"""

from __future__ import annotations

import functools
import math
import string

from hypothesis import strategies as st

from pagedserve.protos.v1 import generation_pb2 as pb

U32_MAX = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
U64_MAX = 2**64 - 1


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each `weight` times as often as a weight of 1 (st.one_of would
    merge repeated branches and pick each about as often)."""
    strategies = [strategy for _, strategy in choices]
    indices = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indices).flatmap(strategies.__getitem__)


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` six times in seven."""
    return weighted((6, valid), (1, anything))


def _edgy_ints(lo: int, hi: int, valid: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, lo + 1, -1, 0, 1, 2, 15, 16, 17, 20, 21, 100, 255, 256, 258,
                                259, 2047, 2048, 2049, 2**31 - 1, 2**31, 2**32 - 1, 2**63,
                                hi - 1, hi) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), valid, st.integers(lo, hi))


def u32(valid: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[int]:
    return _edgy_ints(0, U32_MAX, st.integers(0, 8) if valid is None else valid)


def i32(valid: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[int]:
    return _edgy_ints(I32_MIN, I32_MAX, st.integers(-3, 3) if valid is None else valid)


def u64(valid: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[int]:
    return _edgy_ints(0, U64_MAX, st.integers(0, 1000) if valid is None else valid)


SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 2.0000001, 1e-9, 5e-324, 100.0,
                  100.5, -100.0, -100.5, 1e308, -1e308, math.inf, -math.inf, math.nan]


def doubles(valid: st.SearchStrategy[float] | None = None) -> st.SearchStrategy[float]:
    valid = st.floats(0.0, 1.0) if valid is None else valid
    return st.one_of(st.sampled_from(SPECIAL_FLOATS), valid, st.floats())


_ODD_TEXT = ["", " ", "/", "a/b", "\x00", "\n", "\t\r", "é", "e\u0301", "🙂", "\u202e",
             "\ufeff", "<s>", "</s>", "<pad>", "{{ x }}", "{% if %}", "\\u0000", "'\"",
             "Hello", "hello world", "a" * 300]


def proto_text(max_size: int = 24) -> st.SearchStrategy[str]:
    """What a proto string can hold: any Unicode without surrogates."""
    return st.one_of(st.sampled_from(_ODD_TEXT), st.text(max_size=max_size),
                     st.text(string.printable, max_size=max_size))


def json_text(max_size: int = 24) -> st.SearchStrategy[str]:
    """What a JSON string can hold: also lone surrogates ("\\ud800")."""
    return st.one_of(proto_text(max_size), st.sampled_from(["\ud800", "a\udfffb", "\udc80"]),
                     st.text(st.characters(codec=None, exclude_categories=()), max_size=8))


def repeated(element: st.SearchStrategy, max_size: int = 8,
             huge: int = 100_000) -> st.SearchStrategy[list]:
    """A short random list, or one element repeated up to `huge` times."""
    many = st.builds(lambda value, count: [value] * count, element,
                     st.sampled_from([0, 1, 100, 1000, 2048, huge]))
    return st.one_of(st.lists(element, max_size=max_size), many)


def token_ids(vocab: int, small: bool = False) -> st.SearchStrategy[list[int]]:
    inside = st.integers(0, vocab - 1)
    if small:
        long = st.builds(lambda v, k: [v] * k, inside, st.sampled_from([2047, 2048, 5000]))
        return st.one_of(st.lists(inside, min_size=1, max_size=12), long,
                         st.lists(u32(inside), max_size=6))
    return st.one_of(st.lists(inside, min_size=1, max_size=24), repeated(u32(inside)))


# ---- pagedserve.v1 messages ------------------------------------------------------------------
# Built once per argument set (lru_cache): hypothesis validates a strategy on its first draw,
# and strategies built inside a composite would be validated again at every draw.

def _set_fields(message, fields: dict):
    for name, value in fields.items():
        if name in ("stop", "stop_token_ids"):
            getattr(message, name).extend(value)
        elif name == "logit_bias":
            for key, bias in value.items():
                message.logit_bias[key] = bias
        else:
            setattr(message, name, value)
    return message


@functools.lru_cache
def sampling_messages(vocab: int, small: bool = False,
                      lean: bool = False) -> st.SearchStrategy[pb.SamplingParams]:
    """`lean`: each field mostly valid (so that more requests get through to be answered)."""
    in_vocab = st.integers(0, vocab - 1)
    fields = {  # name: (a valid value, any value of its type leaning on the edges)
        "n": (st.integers(1, 4), st.one_of(st.integers(0, 4), st.sampled_from([9, U32_MAX]))
              if small else u32(st.integers(0, 9))),
        "temperature": (st.floats(0.0, 2.0), doubles(st.floats(0.0, 2.0))),
        "top_p": (st.floats(0.01, 1.0), doubles()),
        "top_k": (st.integers(-1, 300), i32(st.integers(-2, 300))),
        "min_p": (st.floats(0.0, 1.0), doubles()),
        "repetition_penalty": (st.floats(0.1, 3.0), doubles(st.floats(0.0, 3.0))),
        "presence_penalty": (st.floats(-2.0, 2.0), doubles(st.floats(-2.5, 2.5))),
        "frequency_penalty": (st.floats(-2.0, 2.0), doubles(st.floats(-2.5, 2.5))),
        "seed": (st.integers(0, 2**32), u64()),
        "max_tokens": (st.integers(1, 4), st.one_of(st.integers(0, 4),
                                                    st.sampled_from([2049, 5000, U32_MAX]))
                       if small else u32(st.integers(0, 40))),
        "logprobs": (st.integers(0, 20), u32(st.integers(0, 21))),
        "prompt_logprobs": (st.integers(0, 20), u32(st.integers(0, 21))),
        "skip_special_tokens": (st.booleans(), st.booleans()),
        "min_tokens": (st.integers(0, 1), st.one_of(st.integers(0, 5), u32())),
        "include_stop_str_in_output": (st.booleans(), st.booleans()),
        "ignore_eos": (st.booleans(), st.booleans()),
        "stop": (st.lists(st.text(string.ascii_letters, min_size=1, max_size=3), max_size=2),
                 st.lists(proto_text(6), max_size=3)),
        "stop_token_ids": (st.lists(in_vocab, max_size=3),
                           repeated(u32(in_vocab), huge=1000 if small else 100_000)),
        "logit_bias": (st.dictionaries(in_vocab, st.floats(-100.0, 100.0), max_size=3),
                       st.dictionaries(u32(st.integers(0, vocab + 2)),
                                       doubles(st.floats(-100.0, 100.0)), max_size=4)),
    }
    chosen = {name: mostly(valid, full) if lean else full
              for name, (valid, full) in fields.items()}
    return st.fixed_dictionaries({}, optional=chosen).map(
        lambda drawn: _set_fields(pb.SamplingParams(), drawn))


@functools.lru_cache
def beam_messages(small: bool = False,
                  lean: bool = False) -> st.SearchStrategy[pb.BeamSearchParams]:
    fields = {
        "beam_width": st.integers(0, 5) if small else u32(st.integers(0, 9)),
        "max_tokens": st.one_of(st.integers(0, 4), st.sampled_from([2049, U32_MAX])) if small
        else u32(st.integers(0, 40)),
        "ignore_eos": st.booleans(),
    }
    if lean:
        fields["beam_width"] = mostly(st.integers(1, 4), fields["beam_width"])
        fields["max_tokens"] = mostly(st.integers(1, 4), fields["max_tokens"])
    return st.fixed_dictionaries(fields, optional={
        "length_penalty": doubles(st.floats(-2.0, 2.0))}).map(
        lambda drawn: _set_fields(pb.BeamSearchParams(), drawn))


def _build_request(drawn: dict) -> pb.GenerateRequest:
    message = pb.GenerateRequest(request_id=drawn["request_id"], model=drawn["model"],
                                 priority=drawn["priority"])
    prompt = drawn["prompt"]
    if isinstance(prompt, str):
        message.text = prompt
    elif prompt == "empty_ids":
        message.token_ids.SetInParent()
    elif isinstance(prompt, list):
        message.token_ids.ids.extend(prompt)
    if "sampling" in drawn:
        message.sampling.CopyFrom(drawn["sampling"])
    if "beam_search" in drawn:
        message.beam_search.CopyFrom(drawn["beam_search"])
    if drawn.get("cache_salt") is not None:
        message.cache_salt = drawn["cache_salt"]
    return message


@functools.lru_cache
def generate_requests(served_name: str, vocab: int, small: bool = False,
                      prompt: bool = False) -> st.SearchStrategy[pb.GenerateRequest]:
    """A GenerateRequest; `prompt=True` always sets a token-id prompt inside the vocabulary,
    and mostly valid parameters (so that they are what is tested, often accepted)."""
    valid_ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)
    prompts = valid_ids if prompt else st.one_of(
        proto_text(40), token_ids(vocab, small), token_ids(vocab, small), st.none(),
        st.just("empty_ids"))
    sampling, beam = sampling_messages(vocab, small, lean=prompt), beam_messages(small, prompt)
    # What the request runs: sampling (mostly), beam search, both (refused) or neither (the
    # defaults; small: max_tokens 1, as the default 16 would run for a while).
    default = pb.SamplingParams(max_tokens=1) if small else None
    kinds = weighted((6, st.fixed_dictionaries({"sampling": sampling})),
                     (2, st.fixed_dictionaries({"beam_search": beam})),
                     (1, st.fixed_dictionaries({"sampling": sampling, "beam_search": beam})),
                     (1, st.just({"sampling": default} if small else {})))
    fields = st.fixed_dictionaries({
        "request_id": st.one_of(st.just(""), st.just(""), proto_text(16),
                                st.sampled_from(["a/b", "/", "x" * 1000])),
        "model": st.sampled_from(["", served_name]) if prompt else mostly(
            st.sampled_from(["", served_name]),
            st.sampled_from([served_name + " ", "other", served_name.upper()])),
        "prompt": prompts,
        "priority": i32(),
        "cache_salt": st.one_of(st.none(), proto_text(12)),
    })
    return st.builds(lambda base, kind: _build_request({**base, **kind}), fields, kinds)


def tokenize_requests(served_name: str) -> st.SearchStrategy[pb.TokenizeRequest]:
    return st.builds(pb.TokenizeRequest,
                     model=st.sampled_from(["", served_name, "other"]),
                     text=st.one_of(proto_text(60), st.builds(lambda c, k: c * k,
                                                              st.sampled_from("a 🙂\n"),
                                                              st.integers(0, 5000))))


@functools.lru_cache
def detokenize_requests(served_name: str, vocab: int) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(["", served_name, "other"]),
         "token_ids": repeated(u32(st.integers(0, vocab - 1)), huge=20_000)},
        optional={"skip_special_tokens": st.booleans()}).map(
        lambda drawn: pb.DetokenizeRequest(**drawn))


def abort_requests() -> st.SearchStrategy[pb.AbortRequest]:
    return st.builds(pb.AbortRequest, request_ids=repeated(proto_text(12), huge=10_000))


def model_info_requests(served_name: str) -> st.SearchStrategy[pb.GetModelInfoRequest]:
    return st.builds(pb.GetModelInfoRequest,
                     model=st.one_of(st.sampled_from(["", served_name]), proto_text(12)))


# ---- OpenAI HTTP bodies ----------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.sampled_from([2**64, -(2**63) - 1, 10**400]), st.floats(),
                         json_text(12))
JSON_JUNK = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(json_text(6), inner, max_size=3)),
    max_leaves=6)


def _or_junk(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return weighted((3, strategy), (1, JSON_JUNK))


def json_ints(valid: st.SearchStrategy[int]) -> st.SearchStrategy:
    return st.one_of(valid, st.sampled_from([-1, 0, 2**31, -(2**31) - 1, 2**32, 2**63,
                                             U64_MAX, 2**64, 10**30]),
                     st.integers(), st.sampled_from([1.0, 2.5, "3", "x", True]))


def json_floats(valid: st.SearchStrategy[float] | None = None) -> st.SearchStrategy:
    return st.one_of(doubles(valid), st.integers(-3, 3), st.sampled_from(["0.5", "nan", True]))


def _messages(small: bool) -> st.SearchStrategy:
    content = st.one_of(json_text(30), st.none(), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "text", "image_url"]), "text": json_text(12)}),
        max_size=3), JSON_JUNK)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "user", "assistant", "tool",
                                  "robot", ""])},
        optional={"content": content, "name": json_text(8), "tool_calls": JSON_JUNK,
                  "refusal": st.none()})
    return st.one_of(st.lists(message, min_size=1, max_size=4), st.just([]), JSON_JUNK)


def _prompts(vocab: int, small: bool) -> st.SearchStrategy:
    ids = token_ids(vocab, small)
    return st.one_of(json_text(40), ids, st.lists(json_text(10), max_size=3),
                     st.lists(ids, max_size=3), st.sampled_from([[], [[]], "", [""]]),
                     st.lists(st.integers(-(2**40), 2**40), max_size=4), JSON_JUNK)


COMMON_FIELDS = ("model", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                 "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k",
                 "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens", "return_token_ids",
                 "priority", "cache_salt")
COMPLETION_FIELDS = (*COMMON_FIELDS, "prompt", "max_tokens", "logprobs", "echo", "suffix",
                     "best_of")
CHAT_FIELDS = (*COMMON_FIELDS, "messages", "max_completion_tokens", "max_tokens", "logprobs",
               "top_logprobs", "add_generation_prompt")


@functools.lru_cache
def _field_values(served_name: str, vocab: int, chat: bool, small: bool,
                  lean: bool = False) -> dict:
    small_tokens = st.one_of(st.integers(-1, 4), st.sampled_from([2049, 10**6, 2**32, 2**64]),
                             st.sampled_from([1.0, "2", True]))
    tokens = small_tokens if small else st.one_of(json_ints(st.integers(0, 40)), st.none())
    bias = st.dictionaries(st.one_of(st.integers(-2, vocab + 2).map(str),
                                     st.sampled_from(["x", "", " 7 ", "1_0", "٣", "1" * 5000,
                                                      "5.0", "0x10"])),
                           json_floats(st.floats(-101.0, 101.0)), max_size=3)
    values = {
        "model": st.one_of(st.none(), st.just(served_name), json_text(8)),
        "temperature": json_floats(st.floats(0.0, 2.0)),
        "top_p": json_floats(),
        "n": json_ints(st.integers(0, 4 if small else 9)),
        "stream": st.one_of(st.booleans(), st.sampled_from(["true", 1, 0, None])),
        "stream_options": st.one_of(st.none(), st.fixed_dictionaries(
            {}, optional={"include_usage": st.one_of(st.booleans(), JSON_SCALARS)}),
            st.just({"include_usage": True, "extra": 1})),
        "stop": st.one_of(st.none(), json_text(4), st.lists(json_text(4), max_size=3)),
        "seed": json_ints(st.integers(0, 1000)),
        "presence_penalty": json_floats(st.floats(-2.5, 2.5)),
        "frequency_penalty": json_floats(st.floats(-2.5, 2.5)),
        "logit_bias": st.one_of(st.none(), bias),
        "user": json_text(8),
        "top_k": json_ints(st.integers(-2, 300)),
        "min_p": json_floats(),
        "repetition_penalty": json_floats(st.floats(0.0, 3.0)),
        "min_tokens": json_ints(st.integers(0, 5)),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.one_of(st.none(), repeated(json_ints(st.integers(0, vocab + 1)),
                                                        huge=1000)),
        "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "return_token_ids": st.booleans(),
        "priority": json_ints(st.integers(-3, 3)),
        "cache_salt": st.one_of(st.none(), json_text(8)),
        "max_tokens": tokens,
    }
    if chat:
        values.update({
            "messages": _messages(small),
            "max_completion_tokens": tokens,
            "logprobs": st.one_of(st.booleans(), st.sampled_from([1, "yes", None])),
            "top_logprobs": json_ints(st.integers(0, 21)),
            "add_generation_prompt": st.booleans(),
        })
    else:
        values.update({
            "prompt": _prompts(vocab, small),
            "logprobs": json_ints(st.integers(0, 21)),
            "echo": st.one_of(st.just(False), st.booleans()),
            "suffix": st.one_of(st.none(), st.none(), json_text(4)),
            "best_of": json_ints(st.integers(0, 4)),
        })
    bounded = ("max_tokens", "max_completion_tokens") if small else ()
    values = {name: strategy if name in bounded else _or_junk(strategy)
              for name, strategy in values.items()}
    if lean:
        valid = _valid_values(served_name, vocab, chat, small)
        values = {name: mostly(valid[name], strategy) for name, strategy in values.items()}
    return values


@functools.lru_cache
def _valid_values(served_name: str, vocab: int, chat: bool, small: bool) -> dict:
    """A valid value of each field (a body of these alone is accepted, bar top_logprobs
    without logprobs)."""
    in_vocab = st.integers(0, vocab - 1)
    words = st.text(string.ascii_letters, min_size=1, max_size=3)
    tokens = st.integers(1, 4 if small else 40)
    values = {
        "model": st.sampled_from([None, served_name]),
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.01, 1.0),
        "n": st.integers(1, 4),
        "stream": st.booleans(),
        "stream_options": st.one_of(st.none(), st.builds(dict, include_usage=st.booleans())),
        "stop": st.one_of(st.none(), words, st.lists(words, max_size=2)),
        "seed": st.integers(0, 2**32),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "logit_bias": st.dictionaries(in_vocab.map(str), st.floats(-100.0, 100.0), max_size=3),
        "user": proto_text(8),
        "top_k": st.integers(-1, 300),
        "min_p": st.floats(0.0, 1.0),
        "repetition_penalty": st.floats(0.1, 3.0),
        "min_tokens": st.integers(0, 1),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(in_vocab, max_size=3),
        "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "return_token_ids": st.booleans(),
        "priority": st.integers(-3, 3),
        "cache_salt": st.one_of(st.none(), proto_text(8)),
        "max_tokens": tokens,
    }
    if chat:
        turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                      "content": proto_text(20)})
        values.update({
            "messages": st.lists(turn, min_size=1, max_size=3),
            "max_completion_tokens": tokens,
            "logprobs": st.booleans(),
            "top_logprobs": st.integers(0, 20),
            "add_generation_prompt": st.booleans(),
        })
    else:
        ids = st.lists(in_vocab, min_size=1, max_size=12)
        text = st.text(string.printable, min_size=1, max_size=30)
        values.update({
            "prompt": st.one_of(ids, text, st.lists(ids, min_size=1, max_size=2),
                                st.lists(text, min_size=1, max_size=2)),
            "logprobs": st.integers(0, 20),
            "echo": st.just(False),
            "suffix": st.none(),
            "best_of": st.none(),
        })
    return values


UNKNOWN_FIELDS = st.sampled_from(["max_tokenz", "functions", "tools", "response_format",
                                  "prompt_logprobs", "beam_search", "sampling", "request_id",
                                  "temperatur", "Model", "extra_body", "guided_json"])


@st.composite
def http_bodies(draw, served_name: str, vocab: int, chat: bool, small: bool = False,
                lean: bool = False) -> dict:
    """A JSON object for /v1/chat/completions (`chat`) or /v1/completions; `lean`: each
    field mostly valid (so that more bodies get through to be answered)."""
    values = _field_values(served_name, vocab, chat, small, lean)
    required = "messages" if chat else "prompt"
    body = {}
    if lean or draw(st.integers(0, 9)) > 0:
        body[required] = draw(values[required])
    names = draw(st.lists(st.sampled_from(sorted(values)), max_size=8, unique=True))
    for name in names:
        body[name] = draw(values[name])
    if not lean and draw(st.integers(0, 9)) == 0:
        body[draw(UNKNOWN_FIELDS)] = draw(JSON_JUNK)
    if small and chat and "max_completion_tokens" not in body:
        # Neither field set would generate up to the context: a valid request must stop
        # after a few tokens (the small values of both fields are never null).
        body.setdefault("max_tokens", draw(values["max_tokens"]))
    return body


def raw_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are not a JSON object: bytes, other JSON values, truncated or non-UTF-8."""
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"[{}]", b"NaN",
                         b'{"prompt": [1, 2,', b'{"prompt": "\xff\xfe"}', b"\xef\xbb\xbf{}",
                         b'{"prompt": [1], "prompt": "x"}', b'{"messages": [{"role": 1}]}',
                         b'{"prompt": "\\ud800"}', b'{"prompt": [1], "n": 1e999}',
                         b'{"prompt": [1], "max_tokens": -Infinity}', b"\x00" * 10]),
        JSON_JUNK.map(lambda value: _dumps(value)))


def _dumps(value) -> bytes:
    import json

    return json.dumps(value).encode("utf-8", "surrogatepass")
