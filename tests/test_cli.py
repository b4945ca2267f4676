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


def test_bench_plot_without_matplotlib_fails_before_benchmarking(tmp_path):
    """--plot needs matplotlib: without it the command stops at once (no server is contacted) naming the extra."""
    import subprocess
    import sys

    blocked = "import sys; sys.modules['matplotlib'] = None; from inferd.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", blocked, "bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
         "--num-prompts", "1", "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "matplotlib is not installed" in result.stderr and "inferd[bench]" in result.stderr
    assert "Traceback" not in result.stderr
