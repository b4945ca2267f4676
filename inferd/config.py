"""Layer 0: engine configuration, validated once.

`EngineArgs` is what a user passes (strings, "auto"); `EngineArgs.resolve()` checks every field and returns a
frozen `EngineConfig` in which nothing is "auto" any more. Device and dtype are resolved by device.py, which the
engine calls; this module never imports torch.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields

DEFAULT_MODEL = "smollm2-135m-instruct"  # the catalog entry every command uses when --model is not given

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
# Weight quantization schemes; inferd/quant/__init__.py says what each does and resolves "auto".
# "<scheme>-int8act": the same weights, activations quantized to int8 per 32-block (integer dot products).
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4", "gguf-int8act", "int8-int8act", "int4-int8act")
# Kernel backends of a model's layers; inferd/kernels/__init__.py (KERNEL_BACKENDS) says what each does.
# auto: cpu-fused (inferd's fused CPU ops for float32 on CPU, torch elsewhere).
KERNEL_BACKEND_NAMES = ("auto", "cpu-fused", "torch-reference")
# Speculative decoding modes; inferd/spec_decode/policy.py says what each does.
SPECULATIVE_MODES = ("auto", "ngram", "draft", "off")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}


def parse_size_bytes(value: str | int, field_name: str = "size") -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, 1024 -> 1024."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field_name} must be > 0 bytes, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{field_name}: cannot parse {value!r} as a size (examples: 2GiB, 512MiB, 1GB)")
    num_bytes = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if num_bytes <= 0:
        raise ValueError(f"{field_name} must be > 0 bytes, got {value!r}")
    return num_bytes


@dataclass(frozen=True)
class EngineConfig:
    model: str  # resolved local path (HF directory or .gguf file)
    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "bfloat16" | "float16"
    quantization: str  # "none" | "gguf" | "int8" | "int4", optionally with "-int8act"
    max_model_len: int  # prompt + output tokens per sequence
    block_size: int  # tokens per KV block
    kv_cache_memory_bytes: int | None  # None on CUDA = use gpu_memory_utilization of free memory
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    max_num_batched_tokens: int  # token budget of one step
    max_num_seqs: int  # running sequences at most
    seed: int
    served_model_name: str
    speculative: str = "off"  # "auto" | "ngram" | "draft" | "off"
    num_speculative_tokens: int = 5  # proposals verified per request and step, at most
    # The draft model of speculative decoding: a resolved local path, or "self:K" (the target's first K layers);
    # None: no draft model (auto then uses prompt lookup).
    speculative_model: str | None = None
    kernel_backend: str = "cpu-fused"  # "cpu-fused" | "torch-reference": the code the model's layers run


@dataclass
class EngineArgs:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "auto"  # auto: a GGUF file's Q4/Q8 blocks are kept on CPU, else none
    max_model_len: int | None = None  # None: the model's context length, capped at 8192
    block_size: int = 16
    kv_cache_memory: str | int | None = None  # e.g. "2GiB"; None: 2GiB on CPU, a memory fraction on CUDA
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None  # None: 512 on CPU, 8192 on CUDA
    max_num_seqs: int = 64
    seed: int = 0
    served_model_name: str | None = None
    speculative: str = "auto"  # auto: the draft model if one is set, else prompt lookup, while few sequences run
    num_speculative_tokens: int = 5
    # A smaller model with the target's tokenizer (a local path; inferd.LLM and the CLI resolve catalog names), or
    # "self:K": the target's first K layers with its own final norm and output projection (no weights copied).
    speculative_model: str | None = None
    # Keep the finished (repacked) weights here after the first load and map them on later loads: what makes a
    # keep-alive reload or a new Ray replica fast (models/prepared.py). None: off. `inferd serve` sets
    # $INFERD_HOME/prepared.
    prepared_weights_dir: str | None = None
    # The code the model's layers run: cpu-fused (inferd's fused CPU ops) or torch-reference; auto: cpu-fused.
    kernel_backend: str = "auto"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, include_model: bool = True) -> None:
        """The engine flags shared by `inferd generate`, `chat` and `serve` (one per field above); `serve` has its
        own repeatable --model, so it leaves this one out."""
        d = cls()
        g = parser.add_argument_group("engine")
        if include_model:
            g.add_argument("--model", default=DEFAULT_MODEL,
                           help="catalog name (see `inferd list`), a Hugging Face directory or a .gguf file")
        g.add_argument("--device", default=d.device, choices=DEVICES)
        g.add_argument("--dtype", default=d.dtype, choices=DTYPES)
        g.add_argument("--quantization", "-q", default=d.quantization, choices=QUANTIZATIONS,
                       help="weights: auto (keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks on CPU), none (float), "
                            "gguf, int8 or int4 (quantize at load; CPU float32); a -int8act suffix (gguf-int8act) "
                            "also quantizes activations to int8 (integer kernels, faster, slightly less exact)")
        g.add_argument("--kernel-backend", default=d.kernel_backend, choices=KERNEL_BACKEND_NAMES,
                       help="the code the model's layers run on CPU in float32: cpu-fused (inferd's fused kernels; "
                            "auto) or torch-reference (the torch code, e.g. to compare the two)")
        g.add_argument("--max-model-len", type=int, default=d.max_model_len)
        g.add_argument("--kv-cache-memory", default=d.kv_cache_memory,
                       help="KV cache size, e.g. 2GiB (default 2GiB on CPU, a memory fraction on CUDA)")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--speculative", default=d.speculative, choices=SPECULATIVE_MODES,
                       help="speculative decoding: auto (the draft model if --speculative-model is set, else prompt "
                            "lookup, while few sequences run and proposals are accepted), ngram (always prompt "
                            "lookup), draft (always the draft model) or off")
        g.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens)
        g.add_argument("--speculative-model", default=d.speculative_model, metavar="NAME_OR_PATH|self:K",
                       help="draft model for speculative decoding: a smaller model with the same tokenizer (catalog "
                            "name, Hugging Face folder or .gguf file), or self:K for the target's first K layers "
                            "(LayerSkip-style self-speculation, no second copy of the weights)")

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> "EngineArgs":
        d = cls()
        return cls(
            model=getattr(ns, "model", None) if isinstance(getattr(ns, "model", None), str) else None,
            device=ns.device,
            dtype=ns.dtype,
            quantization=ns.quantization,
            max_model_len=ns.max_model_len,
            block_size=ns.block_size,
            kv_cache_memory=ns.kv_cache_memory,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            enable_prefix_caching=not ns.no_prefix_caching,
            max_num_seqs=ns.max_num_seqs,
            max_num_batched_tokens=ns.max_num_batched_tokens,
            seed=ns.seed,
            served_model_name=getattr(ns, "served_model_name", None),
            speculative=getattr(ns, "speculative", d.speculative),
            num_speculative_tokens=getattr(ns, "num_speculative_tokens", d.num_speculative_tokens),
            speculative_model=getattr(ns, "speculative_model", d.speculative_model),
            prepared_weights_dir=getattr(ns, "prepared_weights_dir", None),
            kernel_backend=getattr(ns, "kernel_backend", d.kernel_backend),
        )

    def validate_static(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None:
            parse_size_bytes(self.kv_cache_memory, "kv_cache_memory")
        if self.kernel_backend not in KERNEL_BACKEND_NAMES:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKEND_NAMES}, got {self.kernel_backend!r}")
        if self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {self.speculative!r}")
        if not isinstance(self.num_speculative_tokens, int) or not (1 <= self.num_speculative_tokens <= 16):
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens!r}")
        if self.speculative_model is not None and (not isinstance(self.speculative_model, str)
                                                   or not self.speculative_model.strip()):
            raise ValueError(f"speculative_model must be a model path or self:K, got {self.speculative_model!r}")
        if self.speculative == "draft" and self.speculative_model is None:
            raise ValueError("speculative 'draft' needs speculative_model (--speculative-model NAME_OR_PATH or "
                             "self:K)")

    def resolve(
        self, *, model_path: str, device: str, dtype: str, quantization: str, model_max_len: int
    ) -> EngineConfig:
        """Build the frozen config once the model path, device and dtype are known (see engine/llm_engine.py)."""
        self.validate_static()
        max_model_len = self.max_model_len or min(model_max_len, 8192)
        if max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's context length ({model_max_len})")
        if self.kv_cache_memory is not None:
            kv_bytes: int | None = parse_size_bytes(self.kv_cache_memory, "kv_cache_memory")
        else:
            kv_bytes = 2 << 30 if device == "cpu" else None
        budget = self.max_num_batched_tokens or (512 if device == "cpu" else 8192)
        return EngineConfig(
            model=model_path,
            device=device,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            block_size=self.block_size,
            kv_cache_memory_bytes=kv_bytes,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            max_num_batched_tokens=budget,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            served_model_name=self.served_model_name or (self.model or model_path),
            speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
            speculative_model=self.speculative_model,
            kernel_backend="cpu-fused" if self.kernel_backend == "auto" else self.kernel_backend,
        )
