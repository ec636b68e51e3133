"""The `llm-sae` entry point: help, dispatch, and user errors printed without a traceback."""

from __future__ import annotations

import subprocess
import sys

from llm_sae import cli


def test_help_lists_landed_stages(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli._available():
        assert name in out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "llm_sae.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: llm-sae")


def test_user_error_is_one_line(monkeypatch, capsys):
    import types

    from llm_sae.errors import StoreError

    def run_cli(args):
        raise StoreError("store /x has no manifest.json; run `llm-sae harvest` first")

    fake = types.SimpleNamespace(add_cli=lambda p: None, run_cli=run_cli)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_mod", "a fake stage"))
    monkeypatch.setattr(cli, "_available", lambda: {"fake": ("fake_mod", "a fake stage")})
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "llm-sae fake: error: store /x has no manifest.json; run `llm-sae harvest` first"
