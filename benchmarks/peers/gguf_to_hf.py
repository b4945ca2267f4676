"""Write a Hugging Face directory (config.json, fp32 safetensors, tokenizer, chat template) from a GGUF file.

vLLM's CPU build and transformers load Hugging Face directories, not (quantized) GGUF; this gives them the same
dequantized fp32 weights inferd runs. transformers' GGUF loader dequantizes each tensor and undoes llama.cpp's
q/k row permutation.

    python benchmarks/peers/gguf_to_hf.py in.Q4_1.gguf out_dir/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def convert(gguf_path: Path, out_dir: Path) -> None:
    src_dir, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=file_name, dtype=torch.float32)
    # The loaded model is flagged "gguf-quantized" and refuses save_pretrained, though its weights are already
    # dense fp32: move them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    convert(args.gguf, args.out_dir)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
