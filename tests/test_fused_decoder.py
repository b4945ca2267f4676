"""The fused decoder (torch.ops.inferd.decoder_layers, inferd/kernels/csrc/cpu_decoder.cpp: all layers of an
int8-activation model in one kernel call) against the layer-by-layer path it replaces, which the other tests check
against transformers (tests/test_quant.py, tests/test_model_parity.py) and for batch invariance. The fused path
calls the same row functions, so logits and KV caches must be equal in every bit: for every int8-kernel path this
CPU runs (forced as INFERD_CPU_KERNEL would), with biases, sliding windows, and steps mixing prefills, prefill
chunks, multi-token (speculative-verify shaped) and decode rows."""

from __future__ import annotations

import pytest
import torch

from inferd.kernels import cpu_kernels_available, kernel_build_error
from inferd.layers.paged_driver import PagedDriver
from inferd.models import load_model
from test_model_parity import random_ids, save_tiny_model


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels_available(), f"inferd's CPU kernels did not build: {kernel_build_error()}"


def run_steps(model, arch_config, *, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of every new token over a prefill of two sequences, a step mixing a third one's prefill with
    decodes and a 3-token verify-shaped run, then decode steps -> (logits [T_all, vocab], KV caches)."""
    getattr(model, "target", model).fused_layers_enabled = fused  # an EarlyExitModel runs its target's layers
    driver = PagedDriver(model, arch_config, num_blocks=48, block_size=4)
    logits = [driver.step([("a", random_ids(13, seed=1)), ("b", random_ids(5, seed=2))])]
    logits.append(driver.step([("a", [3]), ("c", random_ids(9, seed=3)), ("b", [4, 5, 6])]))
    for step in range(5):
        logits.append(driver.step([("a", [step + 7]), ("b", [step + 9]), ("c", [step + 11])]))
    return torch.cat(logits), driver.kv_caches


@pytest.mark.parametrize("name", ["llama", "llama_bias", "qwen2", "mistral_sliding_window"])
@pytest.mark.parametrize("method", ["int4-int8act", "int8-int8act"])
def test_fused_layers_equal_the_layer_by_layer_path(name, method, tmp_path):
    _, model_dir = save_tiny_model(name, tmp_path)
    model, arch_config = load_model(model_dir, "cpu", "float32", quantization=method)
    assert model._build_fused_layer_args() is not None
    fused_logits, fused_kv = run_steps(model, arch_config, fused=True)
    plain_logits, plain_kv = run_steps(model, arch_config, fused=False)
    assert torch.equal(fused_logits, plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(fused_kv, plain_kv, strict=True))


def test_fused_layers_equal_the_layer_by_layer_path_on_every_kernel_path(kernel_path, tmp_path):
    _, model_dir = save_tiny_model("llama_bias", tmp_path)
    model, arch_config = load_model(model_dir, "cpu", "float32", quantization="int4-int8act")
    fused_logits, _ = run_steps(model, arch_config, fused=True)
    plain_logits, _ = run_steps(model, arch_config, fused=False)
    assert torch.equal(fused_logits, plain_logits), kernel_path


def test_models_the_fused_kernel_cannot_run_keep_the_layer_path(tmp_path):
    """q/k RMSNorm (Qwen3) and float-activation kernels are not fused: forward takes the layer path."""
    _, model_dir = save_tiny_model("qwen3", tmp_path)
    model, _ = load_model(model_dir, "cpu", "float32", quantization="int4-int8act")
    assert model._build_fused_layer_args() is None
    _, model_dir = save_tiny_model("llama", tmp_path / "float_act")
    model, _ = load_model(model_dir, "cpu", "float32", quantization="int4")
    assert model._build_fused_layer_args() is None


def test_default_model_fused_decode_equals_the_layer_path(default_gguf_path):
    """The real default model under its default scheme (gguf-int8act: Q4_1 layers, a Q8_0 output projection) and
    an early exit (the first 8 layers, as the self-draft proposer runs them)."""
    from inferd.models.early_exit import EarlyExitModel

    model, arch_config = load_model(default_gguf_path, "cpu", "float32", quantization="gguf-int8act")
    fused_logits, fused_kv = run_steps(model, arch_config, fused=True)
    plain_logits, plain_kv = run_steps(model, arch_config, fused=False)
    assert torch.equal(fused_logits, plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(fused_kv, plain_kv, strict=True))
    draft = FirstLayers(model, EarlyExitModel(model, 8))
    fused_logits, _ = run_steps(draft, draft.arch_config, fused=True)
    plain_logits, _ = run_steps(draft, draft.arch_config, fused=False)
    assert torch.equal(fused_logits, plain_logits)


class FirstLayers(torch.nn.Module):
    """An EarlyExitModel as the nn.Module PagedDriver drives (it reads the parameters' dtype)."""

    def __init__(self, target: torch.nn.Module, draft) -> None:
        super().__init__()
        self.target, self.draft, self.arch_config = target, draft, draft.arch_config

    def forward(self, input_ids, positions, attn_metadata, kv_caches):
        return self.draft(input_ids, positions, attn_metadata, kv_caches)

    def compute_logits(self, hidden):
        return self.draft.compute_logits(hidden)


def test_decoder_layers_rejects_what_it_cannot_hold(tmp_path):
    _, model_dir = save_tiny_model("llama", tmp_path)
    model, arch_config = load_model(model_dir, "cpu", "float32", quantization="int4-int8act")
    tensors, ints = model._build_fused_layer_args()
    hidden = torch.zeros(1, arch_config.hidden_size)
    kv = [torch.zeros(2, 4, 4, arch_config.num_kv_heads, arch_config.head_dim)] * arch_config.num_layers
    args = (torch.zeros(1, 1, arch_config.head_dim), torch.zeros(1, 1, arch_config.head_dim),
            torch.tensor([99]), torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
            model.model.norm.weight, arch_config.num_heads, arch_config.num_kv_heads, arch_config.head_dim,
            arch_config.intermediate_size, 1e-5, 0.25)
    with pytest.raises(RuntimeError, match="slot 99 out of the cache's range"):
        torch.ops.inferd.decoder_layers(hidden, tensors, ints, kv, *args)
    with pytest.raises(RuntimeError, match="fewer layer tensors"):
        torch.ops.inferd.decoder_layers(hidden, tensors[:5], ints, kv, *args)
