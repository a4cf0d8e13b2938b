"""`pagedserve serve --log-level` sets the level of every log line, the per-request lines of
`pagedserve.requests` (INFO) included; other commands log at INFO."""

from __future__ import annotations

import logging

import pytest

from pagedserve import cli


@pytest.fixture
def configured(monkeypatch) -> dict:
    """What main() passed to logging.basicConfig; the commands themselves do nothing."""
    seen: dict = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(cli, "serve", lambda args: 0)
    monkeypatch.setattr(cli, "status", lambda args: 0)
    return seen


@pytest.mark.parametrize("given, level", [(["--log-level", "WARNING"], "WARNING"),
                                          (["--log-level", "debug"], "DEBUG"), ([], "INFO")])
def test_serve_logs_at_the_level_given(configured, given, level):
    assert cli.main(["serve", *given]) == 0
    assert configured["level"] == level


def test_status_logs_at_info(configured):
    assert cli.main(["status"]) == 0
    assert configured["level"] == "INFO"


def test_an_unknown_level_is_refused_by_the_parser(configured, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--log-level", "loud"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
