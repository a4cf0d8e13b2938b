"""`python -m pagedserve generate`: the README's main job, end to end on the tiny byte-level
test model (tests/engine/test_default_model.py runs it on the default model)."""

from __future__ import annotations

import json

import pytest

from pagedserve.cli import DEFAULT_QUESTIONS, main


@pytest.fixture
def model(tiny_text_model) -> list[str]:
    return ["--model", tiny_text_model]


def test_generate_writes_outputs_and_is_reproducible(tmp_path, capsys, model):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    args = ["generate", "--prompt", "hello", "--prompt", "paged", "--max-tokens", "6",
            "--temperature", "0.8", "--seed", "3", "--device", "cpu", *model]
    assert main([*args, "--json", str(first)]) == 0
    assert main([*args, "--json", str(second)]) == 0
    records = json.loads(first.read_text())["outputs"]
    assert [r["prompt"] for r in records] == ["hello", "paged"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in records)
    assert records == json.loads(second.read_text())["outputs"]
    assert "2 requests, 12 tokens" in capsys.readouterr().out


def test_bad_sampling_value_exits_2_naming_the_field(capsys, model):
    assert main(["generate", "--prompt", "x", "--top-p", "0", "--device", "cpu", *model]) == 2
    assert "SamplingParams.top_p must be in (0, 1]" in capsys.readouterr().err


def test_no_prompt_chats_the_default_questions(tmp_path, capsys, model):
    out = tmp_path / "chat.json"
    assert main(["generate", "--max-tokens", "4", "--device", "cpu", "--json", str(out),
                 *model]) == 0
    records = json.loads(out.read_text())["outputs"]
    assert [r["prompt"] for r in records] == DEFAULT_QUESTIONS
    assert f"{DEFAULT_QUESTIONS[0]!r} -> " in capsys.readouterr().out


def test_tensor_parallel_size_that_does_not_split_the_model_exits_2(capsys, model):
    assert main(["generate", "--prompt", "x", "--tp", "3", "--device", "cpu", *model]) == 2
    err = capsys.readouterr().err
    assert "tensor parallel size 3 does not evenly split this model" in err
    assert "valid tensor parallel sizes: [1, 2]" in err
