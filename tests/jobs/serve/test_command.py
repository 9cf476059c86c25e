"""`mmembed serve` as a user calls it: its help, and the one-line errors before it listens (the browser test runs
it for real)."""

from __future__ import annotations

import pytest

from jobs.cli import main
from jobs.serve.app import listen


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "example:\n  mmembed serve ./store" in out
    assert "--host H" in out and "127.0.0.1" in out and "--port P" in out


def test_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == f"mmembed: error: no store at {tmp_path / 'nowhere'}\n"


def test_a_taken_port_or_a_bad_one_is_one_line(notes_store, capsys):
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", notes_store, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mmembed: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1
    assert main(["serve", notes_store, "--port", "70000"]) == 1
    assert "--port must be from 1 to 65535" in capsys.readouterr().err
    # an address of no interface here (TEST-NET-1): the bind fails, nothing is sent anywhere
    assert main(["serve", notes_store, "--host", "192.0.2.1"]) == 1
    assert "mmembed: error: cannot listen on 192.0.2.1:8088: " in capsys.readouterr().err
