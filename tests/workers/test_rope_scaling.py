"""RoPE scaling types against transformers: the cos|sin tables bit for bit, and greedy decoding
through the whole engine token for token (also with chunked prefill, and with prompts longer
than yarn's original context); unknown types and partial rotary are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedserve.errors import InvalidArgument, Unsupported
from pagedserve.workers.layers.rotary import SUPPORTED_ROPE_TYPES, rotary_for_config
from pagedserve.workers.models.loader import load_config, load_model
from tests.engine.engine_utils import (
    HFReference,
    StepSpy,
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)
from tests.helpers.tiny_models import save_tiny_checkpoint, tiny_config
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

MAX_POSITIONS = 64
YARN_ORIGINAL = 16
MAX_TOKENS = 16
# 20, 40 and 48 exceed yarn's original context (16); 48 + 16 fills max_position_embeddings,
# the longest sequence dynamic NTK (and the engine) allows.
PROMPTS = make_prompts((3, 12, 20, 40, 48), seed=5)

# Checkpoint variant -> config overrides (on the tiny Llama) for the engine tests.
SCALED_MODELS = {
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": YARN_ORIGINAL}},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
}

# Table-level cases: every parameter transformers reads.
TABLE_CASES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn_explicit": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                      "attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2,
                      "truncate": False},
    "yarn_no_factor": {"rope_type": "yarn", "factor": None,
                       "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic_odd_factor": {"rope_type": "dynamic", "factor": 3.7},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "default": None,
}


@pytest.fixture(scope="module")
def hf() -> HFReference:
    return HFReference()


@pytest.fixture(scope="module")
def scaled_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    saved = {}

    def get(variant: str):
        if variant not in saved:
            saved[variant] = save_tiny_checkpoint(
                tmp_path_factory.mktemp(f"rope-{variant}"), "llama", seed=1,
                max_position_embeddings=MAX_POSITIONS, **SCALED_MODELS[variant])
        return saved[variant]

    return get


def hf_tables(config) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin (attention scaling applied) at every position, [P, D]."""
    positions = torch.arange(config.max_position_embeddings)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0], sin[0]


def assert_table_equals_transformers(config, head_dim: int) -> None:
    ours = rotary_for_config(config, head_dim).cos_sin_cache
    cos, sin = hf_tables(config)
    half = head_dim // 2
    assert torch.equal(ours[:, :half], cos[:, :half])
    assert torch.equal(ours[:, half:], sin[:, :half])


# ---- tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_table_is_bitwise_transformers(case, head_dim):
    config = tiny_config("llama", rope_theta=500000.0, rope_scaling=TABLE_CASES[case],
                         head_dim=head_dim, max_position_embeddings=MAX_POSITIONS)
    assert_table_equals_transformers(config, head_dim)


def test_yarn_attention_factor_is_in_the_table():
    config = tiny_config("llama", head_dim=16, max_position_embeddings=MAX_POSITIONS,
                         rope_scaling=TABLE_CASES["yarn"])
    rope = rotary_for_config(config, 16)
    assert rope.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    # cos^2 + sin^2 is the attention factor squared at every position and frequency.
    cos, sin = rope.cos_sin_cache.chunk(2, dim=-1)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, rope.attention_factor**2))


def test_transformers_4_style_fields_give_the_same_tables():
    """`rope_theta` + `rope_scaling` with the old `type` key, no original length (defaults to
    max_position_embeddings, as transformers standardises), read like transformers 5's
    `rope_parameters`."""
    scaling = {"factor": 4.0, "original_max_position_embeddings": 16}
    new = tiny_config("llama", rope_theta=5000.0, head_dim=16,
                      max_position_embeddings=MAX_POSITIONS,
                      rope_scaling={"rope_type": "yarn", **scaling})
    assert new.rope_parameters["rope_type"] == "yarn"
    old = SimpleNamespace(rope_theta=5000.0, max_position_embeddings=MAX_POSITIONS,
                          rope_scaling={"type": "yarn", **scaling})
    assert torch.equal(rotary_for_config(old, 16).cos_sin_cache,
                       rotary_for_config(new, 16).cos_sin_cache)
    for rope_type in ("yarn", "llama3"):
        extra = {"low_freq_factor": 1.0, "high_freq_factor": 4.0} if rope_type == "llama3" else {}
        no_length = SimpleNamespace(rope_theta=5000.0, max_position_embeddings=MAX_POSITIONS,
                                    rope_scaling={"type": rope_type, "factor": 4.0, **extra})
        explicit = SimpleNamespace(rope_theta=5000.0, max_position_embeddings=MAX_POSITIONS,
                                   rope_scaling={"type": rope_type, "factor": 4.0, **extra,
                                                 "original_max_position_embeddings":
                                                     MAX_POSITIONS})
        assert torch.equal(rotary_for_config(no_length, 16).cos_sin_cache,
                           rotary_for_config(explicit, 16).cos_sin_cache)


def test_top_level_original_length_wins_as_in_transformers():
    """Phi-3 style: a top-level `original_max_position_embeddings` overrides the dict's."""
    config = tiny_config("llama", head_dim=16, max_position_embeddings=MAX_POSITIONS,
                         original_max_position_embeddings=8,
                         rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                       "original_max_position_embeddings": 32})
    assert_table_equals_transformers(config, 16)
    dict_only = tiny_config("llama", head_dim=16, max_position_embeddings=MAX_POSITIONS,
                            rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                          "original_max_position_embeddings": 32})
    assert not torch.equal(rotary_for_config(config, 16).cos_sin_cache,
                           rotary_for_config(dict_only, 16).cos_sin_cache)


def test_dynamic_is_fixed_up_to_max_positions_and_would_grow_past_them():
    """Why `dynamic` is exact here: transformers keeps its frequencies while a call's longest
    sequence fits max_position_embeddings (every call the engine can make), and rescales them
    beyond (which the engine refuses, see below)."""
    config = tiny_config("llama", head_dim=16, max_position_embeddings=MAX_POSITIONS,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours = rotary_for_config(config, 16).cos_sin_cache
    rope = LlamaRotaryEmbedding(config)
    for length in (1, 17, MAX_POSITIONS):
        cos, _ = rope(torch.zeros(1), torch.arange(length)[None])
        assert torch.equal(ours[:length, :8], cos[0, :, :8])
    cos, _ = rope(torch.zeros(1), torch.arange(MAX_POSITIONS + 16)[None])
    assert not torch.equal(ours[:, :8], cos[0, :MAX_POSITIONS, :8])


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_type", ["longrope", "proportional", "fancy"])
def test_unknown_rope_type_is_unsupported(rope_type):
    config = tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    config.rope_parameters = {**config.rope_parameters, "rope_type": rope_type}
    expected = (rf"unsupported rope_scaling type '{rope_type}'; supported: "
                rf"\['default', 'dynamic', 'linear', 'llama3', 'yarn'\]")
    assert list(SUPPORTED_ROPE_TYPES) == ["default", "dynamic", "linear", "llama3", "yarn"]
    with pytest.raises(Unsupported, match=expected):
        rotary_for_config(config, 16)
    with pytest.raises(Unsupported, match=expected):  # the loader's path too
        load_model(config, load_format="dummy")


def test_partial_rotary_is_unsupported():
    config = SimpleNamespace(rope_theta=10000.0, max_position_embeddings=MAX_POSITIONS,
                             rope_scaling=None, partial_rotary_factor=0.5)
    with pytest.raises(Unsupported, match=r"partial_rotary_factor=0.5"):
        rotary_for_config(config, 16)


def test_dynamic_context_beyond_max_positions_is_refused(scaled_checkpoint):
    path = scaled_checkpoint("dynamic")
    with pytest.raises(InvalidArgument, match=r"max_model_len must be <= the model's "
                                              rf"max_position_embeddings \({MAX_POSITIONS}\)"):
        make_llm(path, max_model_len=MAX_POSITIONS + 1)


# ---- greedy parity through the engine ---------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("variant", sorted(SCALED_MODELS))
def test_greedy_matches_transformers(variant, chunked, scaled_checkpoint, hf):
    path = scaled_checkpoint(variant)
    assert load_config(path).rope_parameters["rope_type"] == variant
    kwargs = {"max_num_batched_tokens": 8} if chunked else {}
    llm = make_llm(path, num_gpu_blocks_override=128, **kwargs)
    assert llm.engine.max_model_len == MAX_POSITIONS
    with StepSpy(llm) as log:
        outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    if chunked:
        assert log.max_tokens_per_step <= 8 < len(PROMPTS[-1])
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS, MAX_TOKENS)
    assert_no_leaks(llm)


@pytest.mark.parametrize("variant", ["yarn", "linear"])
def test_scaling_changes_the_greedy_tokens(variant, scaled_checkpoint, hf):
    """Guards the parity test: with default RoPE the same weights decode differently."""
    path = scaled_checkpoint(variant)
    plain = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert plain.config.rope_parameters["rope_type"] == "default"
    scaled = hf.generate_all(path, PROMPTS, MAX_TOKENS)
    with torch.no_grad():
        unscaled = [plain.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                                                                dtype=torch.long),
                                   do_sample=False, max_new_tokens=MAX_TOKENS,
                                   min_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=0,
                                   )[0, len(p):].tolist() for p in PROMPTS]
    assert unscaled != scaled
