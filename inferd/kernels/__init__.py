"""Layer 2: inferd's CPU kernels (csrc/: block-quantized matmuls, fused decode ops), compiled once per machine with the system C++
compiler through torch.utils.cpp_extension and cached in torch's extension directory (~/.cache/torch_extensions).

`-march=native` makes the build CPU-specific, so the CPU's feature flags and torch's version are part of the
extension's name: a home directory shared between machines never loads a build made for another CPU.
If the build fails (no compiler, no ninja), `cpu_kernels_available()` is False and `kernel_build_error()` says
why; `--quantization auto` then falls back to float32 weights, an explicit scheme raises that error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time

import torch

_CSRC_DIR = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC_DIR, name)
            for name in ("cpu_quant_linear.cpp", "cpu_decode_ops.cpp", "cpu_int8_linear.cpp", "cpu_decoder.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "enabled": True}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags_summary() -> str:
    """The CPU's SIMD flags that pick the kernel paths (for benchmark output)."""
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
    flags = set(_cpu_flags().split())
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def _march() -> str:
    """-march for the build: native, or INFERD_CPU_MARCH (e.g. x86-64-v3 to build and test the non-AVX-512 path on
    an AVX-512 machine)."""
    return os.environ.get("INFERD_CPU_MARCH", "native")


def _extension_name() -> str:
    source = b""
    for path in sorted(os.path.join(_CSRC_DIR, name) for name in os.listdir(_CSRC_DIR)):  # .cpp and .inc
        with open(path, "rb") as f:
            source += f.read()
    # The source folder too: torch's build.ninja names the sources by absolute path, so two checkouts sharing one
    # name (and build folder) would rebuild it, ~1 minute, each time the other one loaded it.
    tag = hashlib.sha256(source + torch.__version__.encode() + _cpu_flags().encode() + _march().encode()
                         + os.path.abspath(_CSRC_DIR).encode()).hexdigest()[:12]
    return f"inferd_cpu_kernels_{tag}"


def kernel_build_name() -> str:
    """The name of this machine's kernel build: it hashes the kernel sources, torch's version, the CPU flags and
    -march, so data laid out for these kernels (prepared weights) can be keyed by it."""
    return _extension_name()


def _build() -> None:
    from torch.utils import cpp_extension

    name = _extension_name()
    try:  # a private torch helper, used only to say when a build is about to happen
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        so_path = os.path.join(build_dir, f"{name}.so")
        is_built = os.path.exists(so_path)
        _remove_stale_build_lock(build_dir)
    except Exception:  # noqa: BLE001
        is_built = False
    if is_built:
        # The name hashes the sources, flags and torch version, so an existing library is this build: load it
        # without cpp_extension.load, which takes the folder's lock file even when it finds nothing to do and
        # leaves it behind, for every later process to wait on for good, if it is killed in that moment (a
        # server stopped while it loads). A lock present now is such a leftover or another process's no-op check.
        try:
            torch.ops.load_library(so_path)
            return
        except OSError:
            pass  # a library still being linked by a first build, or cut short: wait for / redo it as before
    if not is_built:
        print("inferd: compiling the CPU kernels once for this machine (about 15 s)...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=_SOURCES,
        # -fopenmp: at::parallel_for runs on the OpenMP pool torch already loaded (same libgomp soname).
        extra_cflags=["-O3", f"-march={_march()}", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


# A build takes well under a minute; torch waits forever on the lock file of a build whose process was killed.
_STALE_BUILD_LOCK_S = 600.0


def _remove_stale_build_lock(build_dir: str) -> None:
    lock_path = os.path.join(build_dir, "lock")
    try:
        age_s = time.time() - os.path.getmtime(lock_path)
    except OSError:
        return  # no lock: nobody is building
    if age_s > _STALE_BUILD_LOCK_S:
        print(f"inferd: removing a stale kernel-build lock ({age_s:.0f} s old; its build was killed)", file=sys.stderr)
        try:
            os.remove(lock_path)
        except OSError:
            pass


def cpu_kernels_available() -> bool:
    """Compile (first call on a machine) and load the kernels; False if that is not possible here."""
    with _lock:
        if _state["loaded"] is None:
            try:
                _build()
                _state["loaded"] = hasattr(torch.ops.inferd, "q4_linear")
            except Exception as exc:  # noqa: BLE001 - any build failure means "not available", with the reason kept
                _state["loaded"] = False
                _state["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        return bool(_state["loaded"])


def kernel_build_error() -> str | None:
    return _state["error"]  # type: ignore[return-value]


def has_avx512_kernels() -> bool:
    """Whether the built kernels have their AVX-512 paths (the quantized matmuls beat float32 there; the portable
    path is correct everywhere but slower than torch's float32 GEMM)."""
    return cpu_kernels_available() and bool(torch.ops.inferd.has_avx512())


def int8_kernel_paths() -> list[str]:
    """The int8-activation kernel paths this CPU runs, best first (the last is "portable"); [] without kernels.
    The kernels use the first unless INFERD_INT8_KERNEL names another (e.g. avx2 on an AVX-512 machine)."""
    return list(torch.ops.inferd.a8_kernel_paths()) if cpu_kernels_available() else []


def has_int8_simd_kernels() -> bool:
    """Whether the int8-activation kernels have a SIMD path here (AVX2 or better; they beat float32 there)."""
    return int8_kernel_paths()[:1] not in ([], ["portable"])


def use_cpu_ops(x: "torch.Tensor") -> bool:
    """Whether the fused CPU ops take this tensor: CPU float32, kernels built, not switched off. Cheap: the
    build result is cached after the first call."""
    # Called ~150 times a decode step: tensor attributes and dict lookups only.
    if not x.is_cpu or x.dtype is not torch.float32 or not _state["enabled"]:
        return False
    loaded = _state["loaded"]
    return cpu_kernels_available() if loaded is None else bool(loaded)


def set_cpu_ops_enabled(enabled: bool) -> bool:
    """Route the layers' fused ops (norm, rotary, decode attention) to the torch reference code instead, e.g. to
    compare the two in tests; returns the previous setting. Quantized matmuls have no torch fallback."""
    previous = bool(_state["enabled"])
    _state["enabled"] = enabled
    return previous
