"""Rewrite a GGUF file with every tensor dequantized to F32, keeping all metadata.

inferd loads the default Q4_1 GGUF and dequantizes it to fp32, so the precision-matched llama.cpp peer runs this
script's output: the same weights, the same fp32 arithmetic.

    python benchmarks/peers/dequantize_gguf.py in.Q4_1.gguf out.F32.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for field in reader.fields.values():
        # GGUF.* are virtual (header counts); the architecture is written by the writer itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """[rows, row bytes] quantized blocks (or an F16/F32 array) -> float32 [*reversed ggml shape]."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # ggml lists dims fastest-first; numpy wants slowest-first.
    return np.ascontiguousarray(values.reshape(tuple(int(d) for d in reversed(tensor.shape))), dtype=np.float32)


def dequantize_file(src_path: Path, dst_path: Path) -> None:
    reader = gguf.GGUFReader(src_path)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst_path, arch)
    copy_metadata(reader, writer)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, dequantize_tensor(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="quantized GGUF")
    parser.add_argument("dst", type=Path, help="F32 GGUF to write")
    args = parser.parse_args(argv)
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = args.dst.with_suffix(".partial")
    dequantize_file(args.src, tmp_path)
    tmp_path.rename(args.dst)
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
