"""The fused CPU ops (inferd/kernels/csrc/cpu_decode_ops.cpp) against the torch code they replace: op by op on
every kernel path this CPU runs, and for a whole model (two models in one process, one per kernel backend; the
torch path is what CUDA and 16-bit dtypes run; test_model_parity.py checks the fused path against transformers,
since float32 on CPU takes it)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from inferd.kernels import KERNEL_BACKENDS, cpu_kernels_available, kernel_build_error
from inferd.layers.attention import AttentionMetadata, paged_attention
from inferd.layers.paged_driver import PagedDriver
from inferd.layers.rotary import apply_rotary
from inferd.models import load_model
from test_model_parity import random_ids, save_tiny_model


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels_available(), f"inferd's CPU kernels did not build: {kernel_build_error()}"


FUSED = KERNEL_BACKENDS["cpu-fused"]
TORCH = KERNEL_BACKENDS["torch-reference"]


def test_rms_norm_ops_match_torch(kernel_path):
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(5, 576, generator=gen), torch.randn(5, 576, generator=gen)
    weight = 1 + 0.2 * torch.randn(576, generator=gen)
    ref = F.rms_norm(x, (576,), weight, 1e-5)
    torch.testing.assert_close(torch.ops.inferd.rms_norm(x, weight, 1e-5), ref, rtol=1e-5, atol=1e-6)
    out, total = torch.ops.inferd.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, F.rms_norm(x + residual, (576,), weight, 1e-5), rtol=1e-5, atol=1e-6)


def test_rotary_inplace_matches_apply_rotary(kernel_path):
    gen = torch.Generator().manual_seed(1)
    num_tokens, heads, kv_heads, head_dim = 7, 4, 2, 32
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 10
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, None]
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1)[:, None]
    view = qkv.view(num_tokens, heads + 2 * kv_heads, head_dim)
    ref = apply_rotary(view[:, : heads + kv_heads], cos, signed_sin)
    untouched = view[:, heads + kv_heads :].clone()
    torch.ops.inferd.rotary_inplace(qkv, cos, signed_sin, heads + kv_heads, head_dim)
    torch.testing.assert_close(view[:, : heads + kv_heads], ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(view[:, heads + kv_heads :], untouched)  # v heads are left alone


@pytest.mark.parametrize("width", [96, 40])  # 40: a vector tail
def test_silu_mul_matches_torch(kernel_path, width):
    gate_up = torch.randn(3, 2 * width, generator=torch.Generator().manual_seed(2)) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -88.0, 0.0])  # saturated and zero gates
    gate, up = gate_up.split(width, dim=-1)
    torch.testing.assert_close(torch.ops.inferd.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab_size", [49152, 37])  # 37: a vector tail
def test_logsumexp_rows_matches_torch(kernel_path, vocab_size):
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(3)) * 8
    logits[1, ::3] = float("-inf")  # a grammar-masked row
    logits[2] = float("-inf")  # everything banned
    logits[3, 5] = float("inf")
    logits[4, 7] = float("nan")
    logits[5, 0] = 1e4  # one dominant logit
    torch.testing.assert_close(torch.ops.inferd.logsumexp_rows(logits), logits.logsumexp(dim=-1), rtol=1e-6,
                               atol=1e-6, equal_nan=True)
    alone = torch.cat([torch.ops.inferd.logsumexp_rows(logits[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, torch.ops.inferd.logsumexp_rows(logits), rtol=0, atol=0, equal_nan=True)


def test_vector_exp_gives_the_same_bits_on_every_simd_path():
    """SiLU over exp's whole range (underflow to the overflow clamp) on every path this CPU runs, against float64;
    the AVX2 exp is the AVX-512 one 8 lanes at a time, so where both run their bits agree. 4992 = 312 x 16
    gates: no path leaves a tail to scalar std::exp."""
    from inferd.kernels import cpu_kernel_paths, set_cpu_kernel_path

    gen = torch.Generator().manual_seed(5)
    gate = torch.cat([torch.linspace(-110.0, 95.0, 4001), torch.randn(991, generator=gen) * 20])
    gate_up = torch.cat([gate, torch.randn(4992, generator=gen)]).reshape(1, -1)
    g, u = gate_up.double().chunk(2, dim=-1)
    outputs = {}
    for path in cpu_kernel_paths():
        previous = set_cpu_kernel_path(path)
        try:
            outputs[path] = torch.ops.inferd.silu_mul(gate_up)
        finally:
            set_cpu_kernel_path(previous)
        torch.testing.assert_close(outputs[path].double(), F.silu(g) * u, rtol=1e-5, atol=1e-30, msg=path)
    if "avx512" in outputs and "avx2" in outputs:
        assert torch.equal(outputs["avx512"], outputs["avx2"])


@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("mixed", [False, True])
def test_paged_decode_attention_matches_the_torch_path(kernel_path, sliding_window, mixed):
    """Decode rows (alone, or mixed with a prefill chunk) over scattered blocks, GQA 6:2, seq lens 1..37."""
    gen = torch.Generator().manual_seed(3)
    block_size, num_blocks, heads, kv_heads, head_dim = 4, 64, 6, 2, 16
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    seq_lens = [1, 9, 37, 16] + ([12] if mixed else [])
    query_lens = [1, 1, 1, 1] + ([5] if mixed else [])
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    max_blocks = max((n + block_size - 1) // block_size for n in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int64)
    slots = []
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        blocks = [free.pop() for _ in range((n + block_size - 1) // block_size)]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n - ql, n)]
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    starts = [0]
    for ql in query_lens:
        starts.append(starts[-1] + ql)

    def run(backend):
        md = AttentionMetadata.build(
            slot_mapping=torch.tensor(slots), query_start_loc=starts, seq_lens=seq_lens,
            num_computed_tokens=[n - ql for n, ql in zip(seq_lens, query_lens)], block_tables=tables,
            block_size=block_size, device="cpu",
        )
        return paged_attention(q, k, v, kv_cache.clone(), md, head_dim**-0.5, sliding_window, backend)

    torch.testing.assert_close(run(FUSED), run(TORCH), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral_sliding_window"])
def test_whole_model_fused_ops_match_the_torch_path(name, tmp_path):
    """Two models of the same weights in one process, one per kernel backend (chosen at load)."""
    _, model_dir = save_tiny_model(name, tmp_path)
    fused_model, arch_config = load_model(model_dir, "cpu", "float32")
    torch_model, _ = load_model(model_dir, "cpu", "float32", kernel_backend="torch-reference")
    assert fused_model.kernel_backend is FUSED and torch_model.model.norm.kernel_backend is TORCH

    def run(model):
        driver = PagedDriver(model, arch_config, num_blocks=32, block_size=8)
        logits = [driver.step([("a", random_ids(13, seed=1)), ("b", random_ids(5, seed=2))])]
        for step in range(6):
            logits.append(driver.step([("a", [step + 3]), ("b", [step + 7])]))
        return torch.cat(logits)

    fused = run(fused_model)
    torch.testing.assert_close(fused, run(torch_model), rtol=1e-5, atol=1e-5)
    assert torch.equal(fused, run(fused_model))  # the torch-reference model left the fused one alone


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_attention_gives_a_token_the_same_bits_however_it_is_batched(kernel_path, sliding_window):
    """A 40-token sequence's attention outputs, computed as one prefill, as prefill chunks, as a short prefill
    then one decode step per token, and in company (other sequences' prefills and decodes in the same steps):
    bitwise equal. (int8 activations turn a rounding-level difference into a different int8 step, so speculative
    verify vs decode and batched vs alone must not differ in any bit.)"""
    gen = torch.Generator().manual_seed(5)
    block_size, num_blocks, heads, kv_heads, head_dim, seq_len = 4, 64, 6, 2, 16, 40
    q = torch.randn(seq_len, heads, head_dim, generator=gen)
    k = torch.randn(seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(seq_len, kv_heads, head_dim, generator=gen)
    other = [torch.randn(seq_len, n, head_dim, generator=gen) for n in (heads, kv_heads, kv_heads)]
    free = list(range(num_blocks))
    random.Random(1).shuffle(free)
    blocks = {name: [free.pop() for _ in range(seq_len // block_size)] for name in ("a", "b")}

    def slots(name, start, end):
        return [blocks[name][p // block_size] * block_size + p % block_size for p in range(start, end)]

    def run(chunks, company):
        """chunks: [(start, end)] of sequence a per step; company: sequence b's (start, end) in each step or None."""
        kv_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim)
        outs = []
        for (start, end), with_b in zip(chunks, company):
            seqs = [("a", start, end, (q, k, v))] + ([("b", *with_b, other)] if with_b else [])
            starts, seq_lens, computed, slot_list, parts = [0], [], [], [], []
            for name, s, e, tensors in seqs:
                starts.append(starts[-1] + e - s)
                seq_lens.append(e)
                computed.append(s)
                slot_list += slots(name, s, e)
                parts.append([t[s:e] for t in tensors])
            tables = torch.tensor([blocks[name] for name, *_ in seqs])
            md = AttentionMetadata.build(slot_mapping=torch.tensor(slot_list), query_start_loc=starts,
                                         seq_lens=seq_lens, num_computed_tokens=computed, block_tables=tables,
                                         block_size=block_size, device="cpu")
            qkv = [torch.cat([p[i] for p in parts]) for i in range(3)]
            outs.append(paged_attention(*qkv, kv_cache, md, head_dim**-0.5, sliding_window)[: end - start])
        return torch.cat(outs)

    whole = run([(0, seq_len)], [None])
    chunked = run([(0, 7), (7, 19), (19, 20), (20, seq_len)], [None, (0, 30), (30, 31), (31, 34)])
    decoded = run([(0, 5)] + [(p, p + 1) for p in range(5, seq_len)], [(0, 3)] + [(p, p + 1) for p in range(3, 38)]
                  + [None, None])
    verified = run([(0, 9)] + [(p, min(p + 4, seq_len)) for p in range(9, seq_len, 4)], [None] * 9)
    for name, out in {"chunked": chunked, "decoded": decoded, "verified": verified}.items():
        assert torch.equal(out, whole), name


def test_kernel_backends_resolve_by_name():
    from inferd.config import KERNEL_BACKEND_NAMES
    from inferd.kernels import resolve_kernel_backend

    assert set(KERNEL_BACKEND_NAMES) == {"auto", *KERNEL_BACKENDS}  # the CLI's choices are the registry's
    assert resolve_kernel_backend("auto") is FUSED and resolve_kernel_backend(None) is FUSED
    assert resolve_kernel_backend("torch-reference") is TORCH
    with pytest.raises(ValueError, match="supported: auto, cpu-fused, torch-reference"):
        resolve_kernel_backend("cuda-graphs")
    assert not TORCH.use_cpu_ops(torch.zeros(2)) and FUSED.use_cpu_ops(torch.zeros(2))
    assert not FUSED.use_cpu_ops(torch.zeros(2, dtype=torch.bfloat16))
