"""Our paged model against Hugging Face transformers on the same tiny checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.workers.models.llama import MODEL_REGISTRY, model_class_for
from pagedserve.workers.models.loader import load_model
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_models import TINY_VARIANTS, hf_reference_logits, tiny_config

TOLERANCE = 1e-4
PROMPT_LENGTHS = {"a": 9, "b": 14, "c": 1}
NUM_DECODE_STEPS = 3


def random_sequences(lengths: dict[str, int], seed: int = 0) -> dict[str, list[int]]:
    """Prompt + decode tokens per sequence (decode tokens are fixed up front, like forcing)."""
    generator = torch.Generator().manual_seed(seed)
    return {seq_id: torch.randint(3, 256, (length + NUM_DECODE_STEPS,),
                                  generator=generator).tolist()
            for seq_id, length in lengths.items()}


def assert_close(ours: torch.Tensor, reference: torch.Tensor, where: str) -> None:
    diff = (ours - reference).abs().max().item()
    assert diff < TOLERANCE, f"{where}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_flat_prefill_then_decode_matches_transformers(variant, tiny_checkpoint):
    checkpoint = tiny_checkpoint(variant)
    sequences = random_sequences(PROMPT_LENGTHS)
    expected = hf_reference_logits(checkpoint, sequences)
    runner = PagedRunner(load_model(checkpoint, dtype="float32"))

    # All three prompts in one flat batch.
    prefill = runner.step([(seq_id, tokens[:PROMPT_LENGTHS[seq_id]])
                           for seq_id, tokens in sequences.items()])
    for (seq_id, _), logits in zip(sequences.items(), prefill, strict=True):
        assert_close(logits, expected[seq_id][:PROMPT_LENGTHS[seq_id]], f"{seq_id} prefill")

    for step in range(NUM_DECODE_STEPS):
        positions = {seq_id: PROMPT_LENGTHS[seq_id] + step for seq_id in sequences}
        decoded = runner.step([(seq_id, [tokens[positions[seq_id]]])
                               for seq_id, tokens in sequences.items()])
        for (seq_id, _), logits in zip(sequences.items(), decoded, strict=True):
            assert_close(logits[0], expected[seq_id][positions[seq_id]],
                         f"{seq_id} decode step {step}")


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_chunked_prefill_next_to_decode_matches_transformers(variant, tiny_checkpoint):
    checkpoint = tiny_checkpoint(variant)
    sequences = random_sequences({"long": 13, "short": 4}, seed=1)
    expected = hf_reference_logits(checkpoint, sequences)
    runner = PagedRunner(load_model(checkpoint, dtype="float32"), block_size=4, seed=3)
    long, short = sequences["long"], sequences["short"]

    # Step 1: first chunk of the long prompt with the whole short prompt.
    first = runner.step([("long", long[:7]), ("short", short[:4])])
    assert_close(first[0], expected["long"][:7], "long chunk 1")
    assert_close(first[1], expected["short"][:4], "short prefill")
    # Step 2: the rest of the long prompt batched with a decode step of the short one.
    second = runner.step([("short", [short[4]]), ("long", long[7:13])])
    assert_close(second[0][0], expected["short"][4], "short decode")
    assert_close(second[1], expected["long"][7:13], "long chunk 2")
    third = runner.step([("long", [long[13]])])
    assert_close(third[0][0], expected["long"][13], "long decode")


def test_sliding_window_changes_mistral_outputs(tiny_checkpoint):
    """Guards the Mistral comparison above: the window really masks something at these lengths."""
    model = load_model(tiny_checkpoint("mistral"), dtype="float32")
    tokens = random_sequences({"a": 14})["a"]
    windowed = PagedRunner(model).step([("a", tokens)])[0]
    for layer in model.model.layers:
        layer.self_attn.attn.sliding_window = None
    unwindowed = PagedRunner(model).step([("a", tokens)])[0]
    window = model.config.sliding_window
    assert torch.equal(windowed[:window], unwindowed[:window])
    assert (windowed[window:] - unwindowed[window:]).abs().max() > 1e-2


def test_tied_embeddings_share_one_tensor(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama_tied"), dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_architecture_mapping():
    for name, model_class in MODEL_REGISTRY.items():
        assert model_class_for(tiny_config("llama", architectures=[name])) is model_class
    with pytest.raises(ValueError, match=r"unsupported model architecture \['GPT2LMHeadModel'\]"
                       r".*LlamaForCausalLM"):
        model_class_for(tiny_config("llama", architectures=["GPT2LMHeadModel"]))


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_an_mlp_activation_other_than_silu_is_refused(activation):
    with pytest.raises(ValueError, match=f"unsupported hidden_act '{activation}'; the MLP "
                                         r"supports only \['silu', 'swish'\]"):
        model_class_for(tiny_config("llama", hidden_act=activation))
    assert model_class_for(tiny_config("llama", hidden_act="swish")) is not None
