"""The layering of ARCHITECTURE.md holds: imports only point down (import-linter contract in pyproject.toml),
the bookkeeping layer runs without torch, and the bench tool never imports the engine or torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint_imports)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_bookkeeping_layer_imports_no_torch():
    code = (
        "import sys\n"
        "import inferd.config, inferd.request, inferd.kv_cache.manager, inferd.scheduler.scheduler\n"
        "assert 'torch' not in sys.modules, 'layer 0/1 pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
