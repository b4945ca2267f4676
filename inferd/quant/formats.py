"""Layer 2: block-quantized weights (32 weights per scale along the input dimension) and their packed form.

`BlockQuantized` is the canonical, row-major form every source maps to:
- GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0 tensors, bit-exact (`from_gguf`): the file's own weights, not a re-quantization
  (Q5_0 as "q8": its 5-bit values less 16 in an int8);
- GGUF Q4_K as "q4" (its per-32 scale d * sc and min -dmin * m, exact in float32 but not in float16), Q6_K as
  "q6" (u in 0..63, w = scale * (u - 32), a float32 scale d * sc per 16), Q5_1 and Q5_K as "q5" (u in 0..31,
  w = scale * u + min per 32; Q5_K's scale and min as Q4_K's): the int8-activation kernels only;
- float weights quantized at load (`quantize`, for `--quantization int8|int4`): int8 as Q8_0 (symmetric,
  scale = absmax / 127), int4 as Q4_1 (asymmetric, scale = (max - min) / 15, min kept).
`pack` turns it into the tile-interleaved layout the float-activation CPU kernels read (csrc/cpu_quant_linear.cpp),
`pack_a8` into the one the int8-activation kernels read (csrc/cpu_int8_linear.cpp); `unpack_a8` inverts it.
`dequantize` is the float32 reference both the kernels and the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_SIZE = 32  # weights per scale, along K
TILE_ROWS = 16  # output rows interleaved in one packed tile

# GGUF block layouts (bytes per 32 weights): Q8_0 = f16 d + 32 x int8; Q4_0 = f16 d + 16 bytes of nibbles
# (w = d * (q - 8)); Q4_1 = f16 d + f16 m + 16 bytes (w = d * q + m). Nibbles: byte j holds element j in its low
# half and element j + 16 in its high half.
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22}
GGUF_KIND = {"Q8_0": "q8", "Q4_0": "q4", "Q4_1": "q4", "Q5_0": "q8"}
# K-quants: 256 weights per super-block; their scales are not float16 values, so only the int8-activation kernels
# (float32 scales) take them.
QK_K = 256
GGUF_SUPER_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210, "Q5_K": 176}
GGUF_Q5_1_BLOCK_BYTES = 24  # f16 d, f16 m, 4 bytes of high bits, 16 bytes of nibbles
GGUF_KIND_INT8_ACTIVATIONS = {**GGUF_KIND, "Q4_K": "q4", "Q6_K": "q6", "Q5_1": "q5", "Q5_K": "q5"}
Q6_BLOCK_SIZE = 16  # q6: weights per scale
Q6_OFFSET = 32  # q6: w = scale * (u - 32)


@dataclass
class BlockQuantized:
    """kind "q4": q uint8 [N, K] in 0..15, w = scales * q + mins; kind "q8": q int8 [N, K], w = scales * q;
    kind "q6": q uint8 [N, K] in 0..63, w = scales * (q - 32); kind "q5": q uint8 [N, K] in 0..31, w = scales * q
    + mins. scales, mins: float32 [N, K / 32] (q6: scales [N, K / 16]; mins None for q8 and q6)."""

    kind: str
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]. scale * q is exact in float32, so this rounds once, like a fused multiply-add."""
        n, k = self.q.shape
        if self.kind == "q6":
            blocks = self.q.view(n, k // Q6_BLOCK_SIZE, Q6_BLOCK_SIZE).to(torch.float32) - Q6_OFFSET
            return (blocks * self.scales[..., None]).view(n, k)
        blocks = self.q.view(n, k // BLOCK_SIZE, BLOCK_SIZE).to(torch.float32) * self.scales[..., None]
        if self.mins is not None:
            blocks = blocks + self.mins[..., None]
        return blocks.view(n, k)

    def permute_rows(self, order: torch.Tensor) -> "BlockQuantized":
        mins = None if self.mins is None else self.mins[order]
        return BlockQuantized(self.kind, self.q[order], self.scales[order], mins)


def can_quantize(shape: tuple[int, ...]) -> bool:
    """Whether a [N, K] weight fits the kernels: K a multiple of the block, N of the tile."""
    return len(shape) == 2 and shape[1] % BLOCK_SIZE == 0 and shape[0] % TILE_ROWS == 0


def _f16_rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def quantize(weight: torch.Tensor, kind: str) -> BlockQuantized:
    """float [N, K] -> BlockQuantized (Q8_0-style for "q8", Q4_1-style for "q4"), round to nearest."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    blocks = w.view(n, k // BLOCK_SIZE, BLOCK_SIZE)
    # Scales and mins are rounded to float16, as GGUF stores them: then scale * q is exact in float32 and the
    # kernels' fused dequantization matches `dequantize` bit for bit.
    if kind == "q8":
        scales = _f16_rounded(blocks.abs().amax(dim=-1) / 127.0)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8)
        return BlockQuantized("q8", q.view(n, k), scales.contiguous(), None)
    if kind == "q4":
        lo, hi = _f16_rounded(blocks.amin(dim=-1)), blocks.amax(dim=-1)
        scales = _f16_rounded((hi - lo) / 15.0)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round((blocks - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
        return BlockQuantized("q4", q.view(n, k), scales.contiguous(), lo.contiguous())
    raise ValueError(f"unknown block quantization kind {kind!r}; supported: q4, q8")


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockQuantized:
    """The exact weights of a GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K tensor. raw: its bytes
    (uint8, any shape), shape: [N, K]."""
    if type_name in GGUF_SUPER_BLOCK_BYTES:
        return _from_gguf_k_quant(type_name, raw, shape)
    if type_name == "Q5_1":  # f16 d, f16 m, 4 bytes of high bits (bit j: element j), 16 bytes of nibbles
        n, k = shape
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK_SIZE, GGUF_Q5_1_BLOCK_BYTES)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _five_bit_values(blocks[..., 8:], blocks[..., 4:8]).reshape(n, k)
        return BlockQuantized("q5", torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))
    if type_name not in GGUF_BLOCK_BYTES:
        raise ValueError(f"GGUF type {type_name} has no block-quantized form; supported: {', '.join(GGUF_BLOCK_BYTES)}")
    n, k = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK_SIZE, GGUF_BLOCK_BYTES[type_name])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if type_name == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
        return BlockQuantized("q8", torch.from_numpy(q), torch.from_numpy(d), None)
    if type_name == "Q5_0":  # f16 d, 4 bytes of high bits (bit j: element j), 16 bytes of nibbles; w = d * (q - 16)
        q = (_five_bit_values(blocks[..., 6:], blocks[..., 2:6]).astype(np.int16) - 16).astype(np.int8).reshape(n, k)
        return BlockQuantized("q8", torch.from_numpy(q), torch.from_numpy(d), None)
    if type_name == "Q4_0":
        nibbles, mins = blocks[..., 2:], -8.0 * d  # d * (q - 8) == d * q + (-8 d), both exact in float32
    else:
        nibbles, mins = blocks[..., 4:], blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)  # elements 0..15, then 16..31
    return BlockQuantized("q4", torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(np.ascontiguousarray(mins)))


def _five_bit_values(nibbles: np.ndarray, high_bytes: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 values u in 0..31, uint8 [..., 32]: nibbles [..., 16] (element j low, j + 16 high), high_bytes
    [..., 4] (a little-endian uint32 whose bit j is element j's fifth bit)."""
    high = high_bytes.copy().view(np.uint32)[..., 0]
    bits = ((high[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1) | (bits << 4)


def _k_quant_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit (scale, min) x 8 -> two uint8 [S, 8]."""
    packed = packed.reshape(-1, 3, 4)
    lo, hi, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return sc, mn


def _from_gguf_k_quant(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockQuantized:
    n, k = shape
    if k % QK_K:
        raise ValueError(f"{type_name} tensor [{n}, {k}]: K must be a multiple of {QK_K}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // QK_K), GGUF_SUPER_BLOCK_BYTES[type_name])
    if type_name in ("Q4_K", "Q5_K"):
        # f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) x 8, [Q5_K: 32 bytes of fifth bits,] 128 bytes of nibbles
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [S, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _k_quant_scales_mins(blocks[:, 4:16])  # [S, 8]
        nibbles = blocks[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (nibbles & 0x0F).reshape(-1, 256)  # chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 high
        kind = "q4"
        if type_name == "Q5_K":  # qh byte l: bit s is the fifth bit of element l of sub-block s
            qh = blocks[:, 16:48]
            bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # [S, 8, 32]
            q = q | (bits.reshape(-1, 256) << 4)
            kind = "q5"
        scales = (d * sc.astype(np.float32)).reshape(n, k // BLOCK_SIZE)  # exact: 11-bit times 6-bit
        mins = -(dmin * mn.astype(np.float32)).reshape(n, k // BLOCK_SIZE)
        return BlockQuantized(kind, torch.from_numpy(np.ascontiguousarray(q.reshape(n, k))),
                              torch.from_numpy(scales), torch.from_numpy(mins))
    # Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16 d
    low = blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(-1, 2, 128)
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (high & 0x03).reshape(-1, 2, 128)
    q = (low | (high << 4)).reshape(n, k)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # [S, 16]
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    scales = (d * sc).reshape(n, k // Q6_BLOCK_SIZE)  # exact: 11-bit times 8-bit
    return BlockQuantized("q6", torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scales), None)


def _as_f16_exactly(x: torch.Tensor, name: str) -> torch.Tensor:
    """The kernels keep scales and mins in float16 (GGUF's own precision); refuse any value that would round."""
    half = x.to(torch.float16)
    if not torch.equal(half.to(torch.float32), x.to(torch.float32)):
        raise ValueError(f"block {name} must be float16 values (GGUF's and quantize()'s are)")
    return half


def _num_tiles(n: int, k: int) -> int:
    """Tiles of 16 output rows in an [n, k] weight, or the error that it cannot be packed."""
    if not can_quantize((n, k)):
        raise ValueError(f"weight [{n}, {k}] cannot be packed: N must be a multiple of {TILE_ROWS}, K of {BLOCK_SIZE}")
    return n // TILE_ROWS


def _tiler(num_tiles: int):
    def tiles(x: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N/16, C, 16]
        return x.reshape(num_tiles, TILE_ROWS, x.shape[-1]).transpose(1, 2).contiguous()

    return tiles


def pack(bq: BlockQuantized) -> dict[str, torch.Tensor]:
    """Kernel layout: {"qs", "scales"[, "mins"]} with output rows interleaved in tiles of 16, scales and mins in
    float16 (see the .cpp)."""
    n, k = bq.shape
    t = _num_tiles(n, k)
    tiles = _tiler(t)
    out = {"scales": tiles(_as_f16_exactly(bq.scales, "scales"))}
    if bq.kind == "q4":
        pairs = bq.q.view(n, k // 2, 2)
        out["qs"] = tiles((pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8))
        out["mins"] = tiles(_as_f16_exactly(bq.mins, "mins"))
    else:
        out["qs"] = tiles(bq.q.to(torch.int8))
    return out


def pack_a8(bq: BlockQuantized) -> dict[str, torch.Tensor]:
    """Layout of the int8-activation kernels: {"qs", "scales"[, "mins"]}; output rows in tiles of 16 with 4
    consecutive k of a row in one dword: q4 qs uint8 [N/16, K/8, 64] (low nibbles k 8g..8g+3, high nibbles
    8g+4..8g+7), q8 qs int8 / q5 and q6 uint8 [N/16, K/4, 64]; scales and mins float16 (or float32) [N/16, K/32,
    16] as in `pack` (q6 scales float32 [N/16, K/16, 16])."""
    n, k = bq.shape
    t = _num_tiles(n, k)
    tiles = _tiler(t)
    if bq.kind == "q6":
        q = bq.q.to(torch.uint8).view(t, TILE_ROWS, k // 4, 4)  # [T, j, g, i], k = 4g + i
        return {"qs": q.permute(0, 2, 1, 3).reshape(t, k // 4, 64).contiguous(),
                "scales": tiles(bq.scales.to(torch.float32))}
    # float16 where every scale and min is one (GGUF's own blocks, quantize()'s), else float32 (Q4_K's)
    values = [bq.scales] if bq.mins is None else [bq.scales, bq.mins]
    is_f16 = bq.kind == "q8" or all(torch.equal(v.to(torch.float16).to(torch.float32), v) for v in values)
    as_stored = (lambda v, name: _as_f16_exactly(v, name)) if is_f16 else (lambda v, name: v.to(torch.float32))
    out = {"scales": tiles(as_stored(bq.scales, "scales"))}
    if bq.kind == "q4":
        q = bq.q.to(torch.uint8).view(t, TILE_ROWS, k // 8, 2, 4)  # [T, j, g, half, i], k = 8g + 4 half + i
        nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [T, j, g, i]
        out["qs"] = nibbles.permute(0, 2, 1, 3).reshape(t, k // 8, 64).contiguous()
        out["mins"] = tiles(as_stored(bq.mins, "mins"))
    else:  # q8 (int8), q5 (uint8 u, and mins)
        q = bq.q.to(torch.int8 if bq.kind == "q8" else torch.uint8).view(t, TILE_ROWS, k // 4, 4)  # k = 4g + i
        out["qs"] = q.permute(0, 2, 1, 3).reshape(t, k // 4, 64).contiguous()
        if bq.kind == "q5":
            out["mins"] = tiles(as_stored(bq.mins, "mins"))
    return out


def unpack_a8(kind: str, packed: dict[str, torch.Tensor]) -> BlockQuantized:
    """The inverse of `pack_a8`: BlockQuantized with float32 scales and mins."""
    qs = packed["qs"]
    t = qs.shape[0]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [N/16, C, 16] -> [N, C] float32
        return x.transpose(1, 2).reshape(t * TILE_ROWS, x.shape[1]).to(torch.float32)

    if kind == "q4":
        k = qs.shape[1] * 8
        b = qs.view(t, k // 8, TILE_ROWS, 4).permute(0, 2, 1, 3)  # [T, j, g, i]
        q = torch.stack([b & 0x0F, b >> 4], dim=3).reshape(t * TILE_ROWS, k)  # [T, j, g, half, i]
        return BlockQuantized("q4", q.contiguous(), rows(packed["scales"]), rows(packed["mins"]))
    k = qs.shape[1] * 4
    q = qs.view(t, k // 4, TILE_ROWS, 4).permute(0, 2, 1, 3).reshape(t * TILE_ROWS, k)
    mins = rows(packed["mins"]) if kind == "q5" else None
    return BlockQuantized(kind, q.contiguous(), rows(packed["scales"]), mins)
