"""The `inferd` command's own behaviour (the commands themselves are exercised by the engine and server tests)."""

from __future__ import annotations

import sys

from inferd import cli


def test_a_command_whose_imports_fail_stays_listed_and_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "inferd.server.app", None)  # `import` of it now raises ImportError
    parser = cli.build_parser()
    assert "serve" in parser.format_help()
    assert cli.main(["serve", "--port", "8000"]) == 2
    err = capsys.readouterr().err
    assert "`inferd serve` cannot run here" in err and "inferd.server.app" in err  # the reason names the import
    # Commands whose imports work are unaffected.
    assert "generate" in parser.format_help() and "bench" in parser.format_help()
