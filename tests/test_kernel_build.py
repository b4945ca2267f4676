"""How the CPU kernels are built and loaded: one build per machine family (its name never hashes this CPU's flags,
its AVX2 / AVX-512 code confined to the per-level copies picked at run time), one clear line and float32 weights
when no compiler exists, and a leftover build lock that must not stall a new process:

A process killed while it loads the CPU kernels must not stall every later start.

torch's cpp_extension.load takes a lock file in the build folder even when the library is already built, and a
process killed in that moment leaves the file behind; the next `inferd serve` then waited on it for good (seen in
the test suite: a server stopped during its start left one, and the next server never became healthy). The
kernels now load an existing build directly; this test leaves a fresh lock behind and starts a new process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from inferd.kernels import _extension_name, cpu_kernels_available

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What only AVX-512 code has: zmm registers, mask registers, xmm16-31 / ymm16-31.
AVX512_OPERANDS = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")


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


def test_the_build_name_depends_on_the_machine_family_not_the_cpu_flags(monkeypatch) -> None:
    """One build per machine family: a venv or home directory copied to another x86-64 machine (other SIMD flags)
    loads the same library; the CPU picks its code path at run time instead."""
    import inferd.kernels as kernels

    name = kernels.kernel_build_name()
    for flags in ("fpu sse2 avx2 fma f16c", "fpu sse2 avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni", "sse2"):
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: flags)
        assert kernels.kernel_build_name() == name
    assert "-march=native" not in kernels._compile_flags()
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.kernel_build_name() != name  # another family, another build


def test_no_compiler_means_one_clear_line_and_float32_under_auto(tmp_path) -> None:
    """Without a C++ compiler the kernels are unavailable with a one-line reason; --quantization auto then keeps
    float32 weights and says so in one line on stderr (an explicit scheme raises the reason)."""
    code = textwrap.dedent("""
        from inferd.kernels import cpu_kernels_available, kernel_build_error
        from inferd.quant import resolve_quantization
        assert not cpu_kernels_available()
        print("ERROR:", kernel_build_error())
        print("AUTO:", resolve_quantization("auto", is_gguf=True, device="cpu", dtype="float32"))
        try:
            resolve_quantization("gguf", is_gguf=True, device="cpu", dtype="float32")
        except ValueError as exc:
            print("EXPLICIT:", exc)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
           "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert "no C++ compiler" in lines["ERROR"] and lines["AUTO"] == "none", result.stdout
    assert "no C++ compiler" in lines["EXPLICIT"]
    stderr_lines = [line for line in result.stderr.splitlines() if line.startswith("inferd:")]
    assert len(stderr_lines) == 1 and "float32 weights" in stderr_lines[0] and "no C++ compiler" in stderr_lines[0]


def test_wide_vector_code_stays_in_its_own_paths() -> None:
    """The library runs on any x86-64 CPU: AVX-512 instructions (zmm or mask registers) appear only in functions of
    the x86-64-v4 copies (namespaces x86_v4, avx512_*), and 256-bit AVX ones only there and in the v3 copies
    (x86_v3, avx2*). A header function (std::, at::) instantiated from a copy keeps the baseline target, so its one
    shared copy is safe for every caller; this reads the built library's disassembly to hold that."""
    import platform
    import shutil

    from torch.utils import cpp_extension

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the per-level copies exist on x86-64 only")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is needed to read the library's code")
    assert cpu_kernels_available()
    so_path = os.path.join(cpp_extension._get_build_directory(_extension_name(), verbose=False),
                           f"{_extension_name()}.so")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so_path], capture_output=True,
                             text=True, check=True).stdout
    function, offenders = "", set()
    num_v4_functions = 0
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
            continue
        is_v4 = any(ns in function for ns in ("x86_v4::", "avx512_vnni::", "avx512_bw::"))
        is_v3 = any(ns in function for ns in ("x86_v3::", "avx2::", "avx2_vnni::"))
        if AVX512_OPERANDS.search(line):
            num_v4_functions += is_v4
            if not is_v4:
                offenders.add(function)
        elif "%ymm" in line and not (is_v4 or is_v3):
            offenders.add(function)
    assert num_v4_functions > 0  # the AVX-512 copies were compiled
    assert not offenders, sorted(offenders)[:20]


def test_inferd_kernels_builds_and_names_the_path() -> None:
    """`inferd kernels`: the build (made here if missing) and the path in use, forced lower by INFERD_CPU_KERNEL."""
    assert cpu_kernels_available()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
           "INFERD_CPU_KERNEL": "portable"}
    result = subprocess.run([sys.executable, "-m", "inferd.cli", "kernels"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"build {_extension_name()}; path in use portable" in result.stdout
