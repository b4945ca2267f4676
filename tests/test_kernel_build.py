"""A process killed while it loads the CPU kernels must not stall every later start.

torch's cpp_extension.load takes a lock file in the build folder even when the library is already built, and a
process killed in that moment leaves the file behind; the next `inferd serve` then waited on it for good (seen in
the test suite: a server stopped during its start left one, and the next server never became healthy). The
kernels now load an existing build directly; this test leaves a fresh lock behind and starts a new process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from inferd.kernels import _extension_name, cpu_kernels_available

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_leftover_build_lock_does_not_stall_a_new_process() -> None:
    from torch.utils import cpp_extension

    assert cpu_kernels_available()  # builds once here if needed, so the library exists
    build_dir = cpp_extension._get_build_directory(_extension_name(), verbose=False)
    lock_path = os.path.join(build_dir, "lock")
    assert not os.path.exists(lock_path)
    open(lock_path, "w").close()  # what a process killed inside cpp_extension.load leaves (seconds old: not stale)
    try:
        code = textwrap.dedent("""
            import torch
            from inferd.kernels import cpu_kernels_available, kernel_build_error
            print(cpu_kernels_available(), kernel_build_error())
            print(hasattr(torch.ops.inferd, "q4_linear"))
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    finally:
        os.remove(lock_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "None", "True"], result.stdout + result.stderr[-2000:]
