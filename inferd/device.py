"""Layer 2: the ONLY place that asks "is CUDA here?" and turns dtype names into torch dtypes; and how models
served side by side share the CPU's threads (CpuThreadShare)."""

from __future__ import annotations

import math
import os
import threading
import time

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if is_cuda_available() else "cpu"
    if name == "cuda" and not is_cuda_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is visible to torch")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """auto: float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on CUDA."""
    if name == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return name


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def free_device_memory_bytes(device: str) -> int:
    if device == "cuda":
        free_bytes, _total = torch.cuda.mem_get_info()
        return free_bytes
    raise ValueError("free_device_memory_bytes is only defined for cuda")


# ---------------------------------------------------------------------------------------------------- CPU threads


_LIBC_MALLOC_TRIM: list = []  # [ctypes function or None], looked up on first use


def release_free_heap_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc's malloc_trim(0)). After a burst of long prefills, glibc keeps
    the freed activation buffers (tens of MiB each step, under its mmap threshold once that has grown) resident;
    the serving loop calls this once it has been idle for a moment. False where the C library has no malloc_trim
    (musl, macOS): nothing to do there."""
    if not _LIBC_MALLOC_TRIM:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC_MALLOC_TRIM.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _LIBC_MALLOC_TRIM.append(None)
    trim = _LIBC_MALLOC_TRIM[0]
    if trim is None:
        return False
    trim(0)
    return True


def num_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuThreadShare:
    """How many torch threads each model's compute thread may use, so models served side by side split the CPUs
    instead of oversubscribing them.

    torch runs a CPU kernel on a team of OpenMP threads that meet at a barrier when it ends. Two models computing
    at once with every CPU each put twice as many threads as CPUs on the machine, and every kernel of either
    then waits for a team member the OS has descheduled: an LLM stream beside embedding traffic on 2 CPUs kept
    35-39% of its speed. Instead, a compute thread calls `claim(holder)` before each unit of work (an LLM step,
    an embedding batch), which sets its torch thread count to its share, and `release(holder)` after it:

        share = CPU_THREADS.register(max_threads=0)      # 0: no cap of its own
        share.claim()   # torch.set_num_threads(num_cpus // number of holders busy now, at least 1, within the cap)
        ... run the batch ...
        share.release()

    A holder counts as busy from its claim until `hold_s` after its release, so a model that works in quick
    succession (decode steps, back-to-back batches) keeps its share between units and the other's thread count
    does not flap. Thread counts are per thread (OpenMP's ICV), so each holder sets only its own.
    """

    def __init__(self, num_cpus: int, hold_s: float = 0.1, is_split: bool = True) -> None:
        self.num_cpus = max(1, num_cpus)
        self.hold_s = hold_s
        self.is_split = is_split  # False: every holder gets num_cpus (its cap permitting) whoever else is busy
        self._lock = threading.Lock()
        self._busy_until: dict[int, float] = {}  # holder id -> monotonic time its busy spell ends (inf: working)
        self._next_id = 0

    def register(self, max_threads: int = 0) -> CpuThreadHolder:
        with self._lock:
            self._next_id += 1
            return CpuThreadHolder(self, self._next_id, max_threads)

    def num_busy_others(self, holder_id: int) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for other, until in self._busy_until.items() if other != holder_id and until > now)

    def _mark(self, holder_id: int, until: float | None) -> None:
        with self._lock:
            if until is None:
                self._busy_until.pop(holder_id, None)
            else:
                self._busy_until[holder_id] = until


class CpuThreadHolder:
    """One compute thread's place in a CpuThreadShare (see there)."""

    def __init__(self, share: CpuThreadShare, holder_id: int, max_threads: int) -> None:
        self.share = share
        self.holder_id = holder_id
        self.max_threads = max_threads  # 0: no cap beyond the share

    def num_threads(self) -> int:
        """This holder's share now: num_cpus split evenly among the busy holders (itself included), >= 1."""
        num_sharing = 1 + self.share.num_busy_others(self.holder_id) if self.share.is_split else 1
        share = max(1, self.share.num_cpus // num_sharing)
        return min(share, self.max_threads) if self.max_threads else share

    def mark_busy(self) -> None:
        """Count this holder as busy until release() (claim() does this and sets the thread count)."""
        self.share._mark(self.holder_id, math.inf)

    def claim(self) -> int:
        """Mark this holder busy and set the calling thread's torch thread count to its share; returns it."""
        self.mark_busy()
        num_threads = self.num_threads()
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
        return num_threads

    def release(self) -> None:
        """The unit of work is done; the holder stays counted as busy for share.hold_s."""
        self.share._mark(self.holder_id, time.monotonic() + self.share.hold_s)

    def close(self) -> None:
        """The holder's model stopped: it no longer counts."""
        self.share._mark(self.holder_id, None)


# The process's CPUs, shared by every model served on CPU. $INFERD_CPU_THREAD_SHARE=off keeps each model at its
# own thread count (benchmarks/embeddings.py mixed --no-cpu-share measures the difference).
CPU_THREADS = CpuThreadShare(num_cpus(), is_split=os.environ.get("INFERD_CPU_THREAD_SHARE", "on") != "off")
