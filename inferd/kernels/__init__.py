"""Layer 2: inferd's CPU kernels (csrc/: block-quantized matmuls, fused decode ops), compiled once with the system
C++ compiler through torch.utils.cpp_extension at first use and cached in torch's extension directory
(~/.cache/torch_extensions).

One build serves a machine family: on x86-64 the library is compiled for plain x86-64 and carries x86-64-v3
(AVX2 + FMA + F16C, AVX-VNNI for the int8 kernels) and x86-64-v4 (AVX-512 F/BW/VL, VNNI for the int8 kernels)
copies of its vector code, one of which is picked at run time from the CPU's features (csrc/inferd_cpu.h).
INFERD_CPU_KERNEL=avx512-vnni|avx512|avx2-vnni|avx2|portable (older name: INFERD_INT8_KERNEL) forces a lower path,
so one machine tests every path it can run. The library's name hashes the sources, torch's version, the compiler's
name and the machine family, never this CPU's flags: a home directory or venv copied to another x86-64 machine
loads the same build. Other CPUs (aarch64) get the portable build for the compiler's default target.

If the build fails (no compiler, no ninja), `cpu_kernels_available()` is False and `kernel_build_error()` says
why in one line; `--quantization auto` then falls back to float32 weights, an explicit scheme raises that error.
Which code a model runs (these kernels or the torch reference) is its kernel backend, chosen at load
(`resolve_kernel_backend`), never a process-wide switch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import sys
import threading
import time

import torch

_CSRC_DIR = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC_DIR, name)
            for name in ("cpu_quant_linear.cpp", "cpu_decode_ops.cpp", "cpu_int8_linear.cpp", "cpu_decoder.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "error_detail": None}


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


def _machine_family() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _compile_flags() -> list[str]:
    """x86-64: the baseline every x86-64 CPU runs (the v3 / v4 copies get their targets from pragmas in the
    sources); elsewhere the compiler's default target."""
    # -fopenmp: at::parallel_for runs on the OpenMP pool torch already loaded (same libgomp soname).
    if _machine_family() == "x86_64":
        return ["-O3", "-march=x86-64", "-mtune=generic", "-fopenmp"]
    return ["-O3", "-fopenmp"]


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _extension_name() -> str:
    source = b""
    for path in sorted(os.path.join(_CSRC_DIR, name) for name in os.listdir(_CSRC_DIR)):  # .cpp, .h and .inc
        with open(path, "rb") as f:
            source += f.read()
    # The source folder too: torch's build.ninja names the sources by absolute path, so two checkouts sharing one
    # name (and build folder) would rebuild it, ~1 minute, each time the other one loaded it. The compiler by
    # name, not version: a copied venv must load its build on a machine that has no compiler.
    parts = [source, torch.__version__.encode(), _machine_family().encode(), _compiler().encode(),
             " ".join(_compile_flags()).encode(), os.path.abspath(_CSRC_DIR).encode()]
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]
    return f"inferd_cpu_kernels_{tag}"


def kernel_build_name() -> str:
    """The name of the kernel build: it hashes the kernel sources, torch's version, the compiler's name and the
    machine family (never the CPU's flags), so data laid out for these kernels (prepared weights) can be keyed by
    it and a copied home directory finds its build on any machine of the family."""
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
        # The name hashes the sources, compiler, machine family and torch version, so an existing library is this
        # build: load it without cpp_extension.load, which takes the folder's lock file even when it finds nothing
        # to do and leaves it behind, for every later process to wait on for good, if it is killed in that moment
        # (a server stopped while it loads). A lock present now is such a leftover or another process's no-op check.
        try:
            torch.ops.load_library(so_path)
            return
        except OSError:
            pass  # a library still being linked by a first build, or cut short: wait for / redo it as before
    if not is_built:
        if shutil.which(_compiler()) is None:
            raise RuntimeError(f"no C++ compiler ({_compiler()!r} is not on PATH; install g++ or set CXX)")
        print("inferd: compiling the CPU kernels once (about a minute)...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=_SOURCES,
        extra_cflags=_compile_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


# A build takes about a minute (two idle cores); torch waits forever on the lock file of a build whose process was killed.
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
                detail = f"{type(exc).__name__}: {exc}".strip()
                _state["error_detail"] = detail[:4000]
                # One line: the first line of the reason (a compiler's log follows it in the detail).
                _state["error"] = f"the CPU kernels could not be built: {detail.splitlines()[0][:300]}"
        return bool(_state["loaded"])


def kernel_build_error() -> str | None:
    """Why the kernels are not available, in one line (None when they are, or before the first try)."""
    return _state["error"]  # type: ignore[return-value]


def kernel_build_error_detail() -> str | None:
    """The whole build failure (the compiler's output included), for a log."""
    return _state["error_detail"]  # type: ignore[return-value]


def has_avx512_kernels() -> bool:
    """Whether the kernel path in use has the AVX-512 float-activation matmuls (they beat float32 there; the
    portable path is correct everywhere but slower than torch's float32 GEMM)."""
    return cpu_kernels_available() and bool(torch.ops.inferd.has_avx512())


def cpu_kernel_paths() -> list[str]:
    """The kernel paths this CPU runs, best first (the last is "portable"); [] without kernels. The kernels use
    the first unless INFERD_CPU_KERNEL (or set_cpu_kernel_path) names another, e.g. avx2 on an AVX-512 machine."""
    return list(torch.ops.inferd.cpu_kernel_paths()) if cpu_kernels_available() else []


def cpu_kernel_path() -> str | None:
    """The kernel path in use for the whole process (None without kernels)."""
    return str(torch.ops.inferd.cpu_kernel_path("")) if cpu_kernels_available() else None


def set_cpu_kernel_path(name: str) -> str:
    """Switch every kernel of the process to path `name` ("auto": the best); returns the previous path. Raises if
    the CPU cannot run it. For tests and benchmarks: a model's results then come from that path's code."""
    if not cpu_kernels_available():
        raise RuntimeError(kernel_build_error())
    previous = str(torch.ops.inferd.cpu_kernel_path(""))
    torch.ops.inferd.cpu_kernel_path(name)
    return previous


def has_int8_simd_kernels() -> bool:
    """Whether the int8-activation kernels have a SIMD path here (AVX2 or better; they beat float32 there)."""
    return cpu_kernel_paths()[:1] not in ([], ["portable"])


# ---- kernel backends: which code a model's layers run, chosen per model at load ------------------------------


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """The code a model's layers run for norms, RoPE, the SiLU gate, paged attention, the sampler's logsumexp
    and (Llama family, int8-activation weights) the fused decoder: inferd's fused CPU ops where `fused_cpu_ops`
    and the tensor is CPU float32, the torch reference code otherwise (what CUDA and 16-bit dtypes run).
    Quantized matmuls have no torch fallback and run the kernels under either backend."""

    name: str
    fused_cpu_ops: bool

    def use_cpu_ops(self, x: torch.Tensor) -> bool:
        """Whether the fused CPU ops take this tensor. Cheap (called ~150 times a decode step): tensor
        attributes, then the cached build result."""
        if not self.fused_cpu_ops or not x.is_cpu or x.dtype is not torch.float32:
            return False
        loaded = _state["loaded"]
        return cpu_kernels_available() if loaded is None else bool(loaded)


KERNEL_BACKENDS: dict[str, KernelBackend] = {
    "cpu-fused": KernelBackend("cpu-fused", fused_cpu_ops=True),
    "torch-reference": KernelBackend("torch-reference", fused_cpu_ops=False),
}
DEFAULT_KERNEL_BACKEND = KERNEL_BACKENDS["cpu-fused"]


def apply_kernel_backend(model: torch.nn.Module, backend: KernelBackend) -> None:
    """Give every module of `model` whose class reads a kernel backend (RMSNorm, attention, MLP, the model) this
    one; a module never set runs DEFAULT_KERNEL_BACKEND."""
    for module in model.modules():
        if hasattr(type(module), "kernel_backend"):
            module.kernel_backend = backend
    model.kernel_backend = backend  # read by the runner (the sampler's logsumexp) whatever the model's class


def resolve_kernel_backend(name: str | KernelBackend | None = None) -> KernelBackend:
    """A backend by name ("auto" or None: cpu-fused, which falls back to torch per tensor where the fused ops do
    not apply: not CPU float32, or no kernels built)."""
    if isinstance(name, KernelBackend):
        return name
    if name in (None, "auto"):
        return DEFAULT_KERNEL_BACKEND
    try:
        return KERNEL_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; supported: auto, {', '.join(KERNEL_BACKENDS)}") from None
