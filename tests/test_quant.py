"""Block-quantized weights and the CPU kernels, against references:
- GGUF blocks: gguf-py's own dequantizer (bit-exact), on random tensors and on the real default model;
- kernels: a float32 matmul on the very same dequantized weights;
- whole models: transformers running the same weights (a tiny model whose Linear weights are replaced by our
  dequantized int8 / int4 weights; transformers' GGUF loader on a tiny GGUF file), logits within 1e-4 and
  greedy tokens equal.
The kernels are compiled on first use; every machine of ours (and CI) has g++, so a failed build fails here.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn
from transformers import AutoModelForCausalLM

import test_gguf_loader as gguf_tests
from inferd.config import EngineArgs
from inferd.layers.paged_driver import PagedDriver
from inferd.models import load_model
from inferd.quant import QuantLinear, plan_quantization, resolve_quantization
from inferd.quant.formats import BLOCK_SIZE, BlockQuantized, from_gguf, pack_a8, quantize, unpack_a8
from inferd.kernels import cpu_kernels_available, has_avx512_kernels, has_int8_simd_kernels, kernel_build_error
from inferd.quant import AUTO_INT8_ACTIVATIONS
from test_model_parity import LOGITS_ATOL, assert_prefill_and_greedy_decode_match, save_tiny_model


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels_available(), f"inferd's CPU kernels did not build: {kernel_build_error()}"


# ---- formats --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q8_0])
def test_gguf_blocks_are_bit_exact(qtype):
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    ref = gguf_dequantize(raw, qtype).reshape(48, 96)
    ours = from_gguf(qtype.name, raw, (48, 96)).dequantize()
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))


def test_default_model_blocks_are_bit_exact(default_gguf_path):
    reader = GGUFReader(str(default_gguf_path))
    seen = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in ("Q4_1", "Q8_0") and kind not in seen:
            seen.add(kind)
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            ref = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            ours = from_gguf(kind, tensor.data, shape).dequantize()
            assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))), tensor.name
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantize_rounds_to_the_nearest_step(kind):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    w[3, :32] = 0.25  # a constant block (q4: scale 0, exact) ...
    w[4, :32] = 0.0  # ... and a zero block (both: scale 0, no division by zero)
    bq = quantize(w, kind)
    err = (bq.dequantize() - w).abs().view(32, 4, 32).amax(dim=-1)
    # Half a step, plus the float16 rounding of scale (and min) GGUF's formats share.
    step = bq.scales
    bound = 0.5 * step + (16 if kind == "q4" else 128) * step * 2**-11 + 1e-6
    if kind == "q4":
        bound = bound + bq.mins.abs() * 2**-11
    assert bool((err <= bound).all())
    assert torch.equal(bq.dequantize()[4, :32], torch.zeros(32))
    if kind == "q4":
        assert torch.equal(bq.dequantize()[3, :32], torch.full((32,), 0.25))


# ---- kernels --------------------------------------------------------------------------------------------------


# The float-activation kernels' weights: quantized here (q4, q8), and GGUF's block types they hold.
FLOAT_KERNEL_WEIGHTS = ["q4", "q8", QType.Q4_0, QType.Q4_1, QType.Q8_0]


@pytest.mark.parametrize("weights", FLOAT_KERNEL_WEIGHTS, ids=lambda w: getattr(w, "name", w))
@pytest.mark.parametrize("out_features", [48, 64])
def test_quant_linear_matches_a_float_matmul_on_the_same_weights(kernel_path, weights, out_features):
    """Every kernel path this CPU runs, every block type, row counts 1..200, against a float32 matmul on the
    dequantized weights (gguf-py's dequantizer for GGUF blocks). 48 output rows = 3 tiles (an unpaired one: the
    in-register path at any row count), 64 = 2 tile pairs; the row counts cover every register tiling of the
    in-register path (< 17 rows) and of the unpack-once GEMM path (>= 17 rows, in blocks of 96)."""
    gen = torch.Generator().manual_seed(out_features)
    in_features = 96
    bias = torch.randn(out_features, generator=gen)
    if isinstance(weights, str):
        w = torch.randn(out_features, in_features, generator=gen)
        layer = QuantLinear(in_features, out_features, weights, bias=True)
        layer.load_rows(0, w[:16])  # shards, as stacked projections load
        layer.load_rows(16, w[16:])
        ref_w = torch.cat([quantize(w[:16], weights).dequantize(), quantize(w[16:], weights).dequantize()])
    else:
        bq, ref_w = blocks_and_reference(weights, out_features, in_features, seed=out_features)
        layer = QuantLinear(in_features, out_features, bq.kind, bias=True)
        layer.load_rows(0, bq)
    with torch.no_grad():
        layer.bias.copy_(bias)
    layer.finalize()
    assert torch.equal(layer.dequantized_weight(), ref_w)
    for num_rows in range(1, 201):
        x = torch.randn(num_rows, in_features, generator=gen)
        torch.testing.assert_close(layer(x), x @ ref_w.T + bias, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{kernel_path}, {num_rows} rows: {m}")
    # Leading dimensions are kept.
    assert layer(x.view(2, 100, in_features)).shape == (2, 100, out_features)


# ---- int8-activation kernels ---------------------------------------------------------------------------------

A8_QTYPES = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K]

def emulate_a8_quantization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization in float32 torch ops: per row and block of 32, d = max|x| / 127,
    q = round_half_even(x * (1 / d)), dsum = d * sum(q). -> q int8 [M, K], d, dsum float32 [M, K/32]."""
    m, k = x.shape
    blocks = x.view(m, k // BLOCK_SIZE, BLOCK_SIZE)
    d = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(m, k), d, d * q.sum(dim=-1)


def emulate_a8_linear(x: torch.Tensor, bq: BlockQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result of the int8-activation matmul (exact up to the float64 sum), and the sum of the absolute
    values of its per-block terms (the scale of the kernels' float32 rounding)."""
    q, d, dsum = emulate_a8_quantization(x)
    n, k = bq.shape
    group = k // bq.scales.shape[1]  # weights per scale: 32, or 16 for q6 (w = s * (u - 32))
    ng = k // group
    wq = bq.q.double() - (32 if bq.kind == "q6" else 0)
    dots = torch.einsum("mgk,ngk->mng", q.view(-1, ng, group).double(), wq.view(n, ng, group))
    d_of_group = d.double().repeat_interleave(BLOCK_SIZE // group, dim=1)  # [M, ng]
    terms = dots * (bq.scales.double()[None] * d_of_group[:, None])
    if bq.mins is not None:
        terms = torch.cat([terms, bq.mins.double()[None] * dsum.double()[:, None]], dim=-1)
    return terms.sum(-1), terms.abs().sum(-1)


def gguf_blocks(qtype: QType, n: int, k: int, seed: int) -> BlockQuantized:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return from_gguf(qtype.name, gguf_quantize(w, qtype), (n, k))


def test_a8_activation_quantization_matches_its_emulation(kernel_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 192, generator=gen) * torch.logspace(-3, 3, 7)[:, None]
    x[1, 32:64] = 0.0  # a zero block: d = 0, q = 0
    x[2, :32] = torch.arange(32) - 15.5  # halves: ties round to even
    q, d, dsum = torch.ops.inferd.a8_quantize_rows(x)
    ref_q, ref_d, ref_dsum = emulate_a8_quantization(x)
    assert torch.equal(q, ref_q) and torch.equal(d, ref_d) and torch.equal(dsum, ref_dsum)
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize("qtype", A8_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("out_features", [48, 64])
def test_a8_linear_matches_the_emulated_int8_matmul(kernel_path, qtype, out_features):
    """Every kernel path this CPU runs, every block type and row counts 1..200 (the multi-row groups,
    single-row tails, tile pairs and an unpaired tile) against (1) a float64 emulation of the same int8
    activation quantization (only float32 rounding differs) and (2) a float32 matmul on the dequantized weights
    (gguf-py's dequantizer), within the error the activation rounding allows (half a step, d / 2, per
    activation)."""
    in_features = 256  # one K-quant super-block
    bq, w = blocks_and_reference(qtype, out_features, in_features, seed=out_features)
    layer = QuantLinear(in_features, out_features, bq.kind, bias=True, int8_activations=True)
    layer.load_rows(0, bq)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.bias.copy_(bias)
    layer.finalize()
    assert torch.equal(layer.dequantized_weight(), w)
    x_all = torch.randn(200, in_features, generator=torch.Generator().manual_seed(2))
    x_all[0, 32:64] = 0.0  # a zero block: d = 0
    # Every row's references at once (a row's result depends on that row alone), then calls of 1..200 rows.
    ref, ref_abs = emulate_a8_linear(x_all, bq)
    _, d, _ = emulate_a8_quantization(x_all)
    step_bound = (w.abs().view(out_features, -1, BLOCK_SIZE).sum(-1)[None] * (d / 2)[:, None]).sum(-1)
    float_ref = x_all.double() @ w.double().T
    for num_rows in range(1, 201):
        x = x_all[200 - num_rows :]  # the zero block in the last call only
        y = (layer(x) - bias).double()
        assert bool(((y - ref[-num_rows:]).abs() <= 1e-5 * ref_abs[-num_rows:] + 1e-6).all()), (
            kernel_path, num_rows)
        bound = step_bound[-num_rows:].double() + 1e-5 * ref_abs[-num_rows:] + 1e-6
        assert bool(((y - float_ref[-num_rows:]).abs() <= bound).all()), (kernel_path, num_rows)
    assert layer(x_all.view(2, 100, in_features)).shape == (2, 100, out_features)


GGUF_KIND_OF = {QType.Q4_0: "q4", QType.Q4_1: "q4", QType.Q8_0: "q8"}


def random_gguf_bytes(qtype: QType, n: int, k: int, seed: int) -> np.ndarray:
    """Random blocks of a GGUF type (any bit pattern of the quants and 6-bit / 8-bit sub-scales) with finite
    float16 super-scales around 1e-2: K-quants, which gguf-py cannot quantize to."""
    rng = np.random.default_rng(seed)
    super_bytes = {QType.Q4_K: 144, QType.Q5_K: 176, QType.Q6_K: 210}
    weights_per_block = 256 if qtype in super_bytes else 32
    num_blocks = n * k // weights_per_block
    block_bytes = super_bytes.get(qtype) or {QType.Q5_0: 22, QType.Q5_1: 24}[qtype]
    raw = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)

    def f16(count: int) -> np.ndarray:
        return (rng.uniform(0.5, 1.5, size=(num_blocks, count)) * 1e-2).astype(np.float16).view(np.uint8)

    offset, count = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208, 1), QType.Q5_0: (0, 1),
                     QType.Q5_1: (0, 2)}[qtype]
    raw[:, offset : offset + 2 * count] = f16(count)
    return raw


def blocks_and_reference(qtype: QType, n: int, k: int, seed: int) -> tuple[BlockQuantized, torch.Tensor]:
    """(the blocks as inferd holds them, gguf-py's own float32 dequantization of the same bytes)."""
    if qtype in (QType.Q4_0, QType.Q4_1, QType.Q8_0):
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
        raw = gguf_quantize(w, qtype)
    else:
        raw = random_gguf_bytes(qtype, n, k, seed)
    reference = gguf_dequantize(raw.reshape(-1), qtype).reshape(n, k).astype(np.float32)
    return from_gguf(qtype.name, raw, (n, k)), torch.from_numpy(reference)




@pytest.mark.parametrize("qtype", [QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K])
def test_more_gguf_block_types_are_exact(qtype):
    """Q5_0 (as q8), Q4_K (as q4 with float32 scales and mins), Q6_K (as q6), Q5_1 and Q5_K (as q5: u in 0..31
    with a scale and a min per 32) hold the file's exact weights:
    bit-equal to gguf-py's dequantizer; the int8-activation packing keeps them."""
    bq, reference = blocks_and_reference(qtype, 32, 512, seed=4)
    assert torch.equal(bq.dequantize(), reference)
    assert torch.equal(unpack_a8(bq.kind, pack_a8(bq)).dequantize(), reference)


@pytest.mark.parametrize("qtype", A8_QTYPES)
def test_a8_linear_rows_are_batch_invariant(kernel_path, qtype):
    """Every block type: a row's output is the same bits alone and at any position of a batch of any size 1..200
    (what keeps a request's greedy tokens independent of its company), and close to a float32 matmul of the
    int8-quantized activations (q * d) with the dequantized weights (gguf-py's dequantization)."""
    in_features, out_features = 512, 80  # 5 tiles: tile pairs and an unpaired tile; 2 K-quant super-blocks
    bq, w = blocks_and_reference(qtype, out_features, in_features, seed=7)
    layer = QuantLinear(in_features, out_features, bq.kind, bias=False, int8_activations=True)
    layer.load_rows(0, bq)
    layer.finalize()
    assert torch.equal(layer.dequantized_weight(), w)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, in_features, generator=gen) * torch.logspace(-2, 2, 200)[:, None]
    x[5, 32:64] = 0.0  # a zero block: d = 0
    full = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(200)])
    assert torch.equal(full, alone), kernel_path
    for n in range(2, 200):
        start = (37 * n) % (201 - n)
        assert torch.equal(layer(x[start : start + n]), full[start : start + n]), (kernel_path, n, start)
    q, d, _ = emulate_a8_quantization(x)
    x_int8 = q.double() * d.double().repeat_interleave(BLOCK_SIZE, dim=1)
    ref = x_int8 @ w.double().T
    ref_abs = x_int8.abs() @ w.abs().double().T
    assert bool(((full.double() - ref).abs() <= 1e-5 * ref_abs + 1e-6).all()), kernel_path
    # and within the activation rounding's reach (half a step, d / 2, per activation) of the float32 matmul
    step_bound = (w.abs().view(out_features, -1, BLOCK_SIZE).sum(-1)[None] * (d / 2)[:, None]).sum(-1)
    assert bool(((full.double() - x.double() @ w.double().T).abs() <= step_bound + 1e-5 * ref_abs + 1e-6).all())


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_a8_packing_round_trips(kind):
    bq = quantize(torch.randn(32, 256, generator=torch.Generator().manual_seed(0)), kind)
    back = unpack_a8(kind, pack_a8(bq))
    assert torch.equal(back.q, bq.q) and torch.equal(back.scales, bq.scales)
    assert (back.mins is None) == (bq.mins is None) and (bq.mins is None or torch.equal(back.mins, bq.mins))


def test_kernel_path_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="unknown path"):
        torch.ops.inferd.cpu_kernel_path("avx9")
    assert torch.ops.inferd.cpu_kernel_paths()[-1] == "portable"


def test_quant_linear_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="kind"):
        QuantLinear(64, 64, "q3", bias=False)
    layer = QuantLinear(64, 32, "q8", bias=False)
    with pytest.raises(ValueError, match="do not fit"):
        layer.load_rows(16, torch.zeros(32, 64))


# ---- plans and resolution ---------------------------------------------------------------------------------


def test_plan_keeps_only_layers_with_one_block_kind_and_a_fitting_shape():
    linears = {
        "a": ((32, 64), ["a.q", "a.k"]),
        "mixed": ((32, 64), ["m.q", "m.k"]),
        "float": ((32, 64), ["f"]),
        "odd": ((30, 64), ["o"]),
        "lm_head": ((256, 64), ["head"]),
    }
    kinds = {"a.q": "q4", "a.k": "q4", "m.q": "q4", "m.k": "q8", "f": None, "o": "q8", "head": "q8"}
    assert plan_quantization(linears, "gguf", kinds) == {"a": "q4", "lm_head": "q8"}
    assert plan_quantization(linears, "int4") == {"a": "q4", "mixed": "q4", "float": "q4", "lm_head": "q8"}
    assert plan_quantization(linears, "int8") == {"a": "q8", "mixed": "q8", "float": "q8", "lm_head": "q8"}
    assert plan_quantization(linears, "none") == {}
    assert plan_quantization(linears, "gguf-int8act", kinds) == {"a": "q4+a8", "lm_head": "q8+a8"}
    assert plan_quantization(linears, "int8-int8act")["float"] == "q8+a8"


def test_resolve_quantization():
    # auto: int8 activations where the gate let them be the default and a SIMD path runs; else GGUF blocks where
    # the AVX-512 float-activation kernels are (they beat float32 there); elsewhere float32.
    if AUTO_INT8_ACTIVATIONS and has_int8_simd_kernels():
        expected_auto = "gguf-int8act"
    else:
        expected_auto = "gguf" if has_avx512_kernels() else "none"
    assert resolve_quantization("auto", is_gguf=True, device="cpu", dtype="float32") == expected_auto
    assert resolve_quantization("auto", is_gguf=False, device="cpu", dtype="float32") == "none"
    assert resolve_quantization("auto", is_gguf=True, device="cpu", dtype="bfloat16") == "none"
    assert resolve_quantization("auto", is_gguf=True, device="cuda", dtype="bfloat16") == "none"
    assert resolve_quantization("int4", is_gguf=False, device="cpu", dtype="float32") == "int4"
    assert resolve_quantization("gguf-int8act", is_gguf=True, device="cpu", dtype="float32") == "gguf-int8act"
    assert resolve_quantization("int4-int8act", is_gguf=False, device="cpu", dtype="float32") == "int4-int8act"
    with pytest.raises(ValueError, match="'gguf-int8act' needs a .gguf"):
        resolve_quantization("gguf-int8act", is_gguf=False, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="'gguf' needs a .gguf"):
        resolve_quantization("gguf", is_gguf=False, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="CPU in float32"):
        resolve_quantization("int8", is_gguf=False, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("fp8", is_gguf=False, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineArgs(quantization="fp8").validate_static()


# ---- whole models against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_bias", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_quantized_model_matches_transformers_on_the_same_weights(name, method, tmp_path):
    hf_model, model_dir = save_tiny_model(name, tmp_path)
    model, arch_config = load_model(model_dir, "cpu", "float32", quantization=method)
    kinds = {n: m.kind for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    layer_kind = "q8" if method == "int8" else "q4"
    assert len(kinds) == 4 * arch_config.num_layers + 1
    assert kinds.pop("quant_lm_head") == "q8" and set(kinds.values()) == {layer_kind}
    with torch.no_grad():  # transformers, given exactly the weights our kernels use
        for module_name, module in hf_model.named_modules():
            if isinstance(module, nn.Linear):
                kind = "q8" if module_name == "lm_head" else layer_kind
                module.weight.copy_(quantize(module.weight, kind).dequantize())
    assert_prefill_and_greedy_decode_match(model, arch_config, hf_model, num_decode_steps=16)


@pytest.mark.parametrize("name", ["llama_tied", "llama", "qwen2"])
def test_gguf_blocks_kept_match_transformers_gguf_loader(name, tmp_path, monkeypatch):
    # Storage types where every stacked projection has one block kind (q/k/v Q8_0, gate/up Q4_1).
    for part, qtype in {"self_attn.v_proj": QType.Q8_0, "mlp.up_proj": QType.Q4_1}.items():
        monkeypatch.setitem(gguf_tests._BLOCK_TENSORS, part, (gguf_tests._BLOCK_TENSORS[part][0], qtype))
    monkeypatch.setitem(gguf_tests._TOP_TENSORS, "model.embed_tokens", ("token_embd", QType.Q8_0))
    config = gguf_tests.CONFIGS[name]()
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gguf_tests.randomize_(original, seed=0)
    path = str(tmp_path / "tiny.gguf")
    gguf_tests.write_gguf(original, gguf_tests.GGUF_ARCH[name.split("_")[0]], path)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()

    model, arch_config = load_model(path, "cpu", "float32", quantization="gguf")
    kinds = {n.rsplit(".", 1)[-1]: m.kind for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert kinds == {"qkv_proj": "q8", "o_proj": "q4", "gate_up_proj": "q4", "down_proj": "q8", "quant_lm_head": "q8"}
    assert_prefill_and_greedy_decode_match(model, arch_config, reference, num_decode_steps=16)

    # The same file with its blocks dequantized at load gives the same logits.
    dense, _ = load_model(path, "cpu", "float32", quantization="none")
    ids = [random.Random(2).randrange(config.vocab_size) for _ in range(20)]
    quant_logits = PagedDriver(model, arch_config, num_blocks=8, block_size=8).step([("s", ids)])
    dense_logits = PagedDriver(dense, arch_config, num_blocks=8, block_size=8).step([("s", ids)])
    assert (quant_logits - dense_logits).abs().max().item() <= LOGITS_ATOL

    # int8 activations: every kept layer switches; logits stay within the activation rounding's reach (the
    # kernels themselves are checked against an exact emulation above).
    a8_model, _ = load_model(path, "cpu", "float32", quantization="gguf-int8act")
    a8_layers = [m for m in a8_model.modules() if isinstance(m, QuantLinear)]
    assert len(a8_layers) == 4 * arch_config.num_layers + 1 and all(m.int8_activations for m in a8_layers)
    a8_logits = PagedDriver(a8_model, arch_config, num_blocks=8, block_size=8).step([("s", ids)])
    # Measured: 1-2% of the largest logit on these tiny random models; a wrong layout or scale is far off.
    assert (a8_logits - quant_logits).abs().max().item() <= 0.05 * quant_logits.abs().max().item()


# ---- the int8-activation scheme through the whole engine ---------------------------------------------------------


def test_int8_activation_engine_is_batch_invariant(default_gguf_path):
    """Each activation row is quantized on its own, the integer sums are exact and every token's attention is one
    row of the fused kernel, so with int8 activations too a request's greedy tokens do not depend on its batch:
    alone, batched, prefilled in 8-token chunks while others decode, and recomputed after preemption (the
    engine's contract, tests/test_engine.py, on the float-activation kernels)."""
    from inferd import LLM, SamplingParams

    def make(**kwargs) -> LLM:
        return LLM(model=str(default_gguf_path), max_model_len=512, quantization="gguf-int8act",
                   kv_cache_memory=kwargs.pop("kv_cache_memory", "64MiB"), **kwargs)

    llm = make()
    assert llm.engine.config.quantization == "gguf-int8act"
    tok = llm.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,")]
    prompts.append(tok.encode_chat([{"role": "user", "content": "Why is the sky blue?"}]))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == alone
    chunked = make(max_num_batched_tokens=8)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params)] == alone
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4  # K and V x layers x block_size x kv heads x head_dim x fp32
    tiny = make(kv_cache_memory=5 * block_bytes)  # 80 tokens for 4 sequences of up to ~45: preemption
    assert [o.outputs[0].token_ids for o in tiny.generate(prompts, params)] == alone
    assert tiny.engine.get_stats().num_preemptions > 0
