"""`pagedserve generate` turns user errors into one line on stderr and exit status 2; bugs keep
their traceback. No engine is built here: the errors come before it, or from a stand-in."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from pagedserve import cli
from pagedserve.errors import Internal, InvalidArgument, ResourceExhausted, Unsupported

REPO = Path(__file__).resolve().parents[2]
MISSING_MODEL = ("pagedserve: error: --model '/nonexistent' is not a directory; give a Hugging "
                 "Face checkpoint directory or a .gguf file, or leave --model out for the embedded "
                 "model\n")


def test_missing_model_directory_is_one_line_and_status_2(capsys):
    assert cli.main(["generate", "--model", "/nonexistent"]) == 2
    captured = capsys.readouterr()
    assert captured.err == MISSING_MODEL
    assert captured.out == ""


def test_missing_model_directory_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "pagedserve", "generate", "--model",
                             "/nonexistent"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (2, MISSING_MODEL, "")


def test_a_file_is_not_a_model_directory(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    assert cli.main(["generate", "--model", str(checkpoint)]) == 2
    assert capsys.readouterr().err.startswith(f"pagedserve: error: --model '{checkpoint}' is "
                                              "not a directory;")


def test_bad_sampling_value_is_refused_before_the_engine_is_imported(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "pagedserve.llm", raising=False)
    assert cli.main(["generate", "--top-p", "0"]) == 2
    assert capsys.readouterr().err == ("pagedserve: error: SamplingParams.top_p must be in "
                                       "(0, 1], got 0.0\n")
    assert "pagedserve.llm" not in sys.modules


def _engine_raising(monkeypatch, error: BaseException) -> dict:
    """Put a stand-in `pagedserve.llm.LLM` in place that records its arguments and raises."""
    seen: dict = {}

    def llm(**kwargs):
        seen.update(kwargs)
        raise error

    monkeypatch.setitem(sys.modules, "pagedserve.llm", types.SimpleNamespace(LLM=llm))
    return seen


@pytest.mark.parametrize(("error", "line"), [
    (InvalidArgument("EngineConfig.cpu_threads must be None or an integer in [1, 1024], got 0"),
     "EngineConfig.cpu_threads must be None or an integer in [1, 1024], got 0"),
    (ResourceExhausted("EngineConfig.kv_cache_memory_gib=1e6 asks for more than there is"),
     "EngineConfig.kv_cache_memory_gib=1e6 asks for more than there is"),
    (Unsupported("no kernel for\nthis model"), "no kernel for this model"),
    (ValueError("tensor parallel size 3 does not evenly split this model"),
     "tensor parallel size 3 does not evenly split this model"),
    (FileNotFoundError("model directory '/m' has no config.json"),
     "model directory '/m' has no config.json"),
])
def test_user_errors_from_the_engine_are_one_line_and_status_2(monkeypatch, capsys, error,
                                                               line):
    _engine_raising(monkeypatch, error)
    assert cli.main(["generate", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"pagedserve: error: {line}\n"


@pytest.mark.parametrize("error", [Internal("scheduler invariant broken"),
                                   RuntimeError("CUDA error: an illegal memory access"),
                                   KeyError("layers.0")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    _engine_raising(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        cli.main(["generate", "--prompt", "x"])
    assert raised.value is error


def test_cpu_threads_reaches_the_engine(monkeypatch):
    seen = _engine_raising(monkeypatch, InvalidArgument("stop here"))
    assert cli.main(["generate", "--cpu-threads", "3", "--device", "cpu"]) == 2
    assert (seen["cpu_threads"], seen["device"], seen["model"]) == (3, "cpu", None)
