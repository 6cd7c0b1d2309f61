"""Fused q/k/v and gate/up projections (`infer/fuse.py`): the stock model's outputs, state dict and files."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from openowl import OwlForConditionalGeneration
from openowl.config import get_preset
from openowl.infer.fuse import FusedLlamaAttention, FusedLlamaMLP, fuse_projections, unfuse_projections


@pytest.fixture(scope="module")
def stock() -> OwlForConditionalGeneration:
    torch.manual_seed(0)
    model = OwlForConditionalGeneration(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def _logits(model: OwlForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.language_model(input_ids=ids).logits


def _random_state(model: OwlForConditionalGeneration) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=generator) / 50 for k, v in model.state_dict().items()}


IDS = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(2))


def test_fused_layers_compute_the_stock_logits_over_the_same_memory(stock):
    model = copy.deepcopy(stock)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.language_model.config.num_hidden_layers
    assert fuse_projections(model.language_model) == 2 * layers
    attention, mlp = model.language_model.model.layers[0].self_attn, model.language_model.model.layers[0].mlp
    assert type(attention) is FusedLlamaAttention and type(mlp) is FusedLlamaMLP
    torch.testing.assert_close(_logits(model, IDS), _logits(stock, IDS))
    # the parts are views of the fused weights: no second copy, and the state dict is the stock one
    fused = attention.qkv_proj.weight
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attention.v_proj.weight.data_ptr() == fused.data_ptr() + fused[: -attention.v_proj.out_features].nbytes
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_proj.weight[mlp.gate_proj.out_features :].data_ptr()
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert fuse_projections(model.language_model) == 2 * layers  # again: nothing new
    assert attention.qkv_proj.weight is fused


def test_fused_model_saves_the_stock_files_and_loads_into_its_fused_weights(stock, tmp_path):
    model = copy.deepcopy(stock)
    fuse_projections(model.language_model)
    model.save_pretrained(tmp_path / "fused")
    stock.save_pretrained(tmp_path / "stock")
    saved, expected = (
        load_file(tmp_path / "fused" / "model.safetensors"),
        load_file(tmp_path / "stock" / "model.safetensors"),
    )
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)

    state = _random_state(model)
    reference = copy.deepcopy(stock)
    reference.load_state_dict(state)
    model.load_state_dict(state)  # copies into the parts, which are the fused weights' memory
    torch.testing.assert_close(_logits(model, IDS), _logits(reference, IDS))
    assigned = copy.deepcopy(model)
    assigned.load_state_dict({k: v * 2 for k, v in state.items()}, assign=True)  # new tensors: fused ones rebuilt
    reference.load_state_dict({k: v * 2 for k, v in state.items()})
    torch.testing.assert_close(_logits(assigned, IDS), _logits(reference, IDS))


def test_unfusing_keeps_or_drops_the_fused_weights(stock):
    model = copy.deepcopy(stock)
    lm = model.language_model
    fuse_projections(lm)
    attention = lm.model.layers[0].self_attn
    fused = attention.qkv_proj
    assert unfuse_projections(lm, keep=True) == 2 * lm.config.num_hidden_layers
    assert type(attention).__name__ == "LlamaAttention" and attention.qkv_proj is fused
    torch.testing.assert_close(_logits(model, IDS), _logits(stock, IDS))
    fuse_projections(lm)
    assert type(attention) is FusedLlamaAttention and attention.qkv_proj is fused  # switched back, nothing rebuilt

    unfuse_projections(lm, keep=True)
    attention.q_proj.weight = torch.nn.Parameter(attention.q_proj.weight * 2)  # no longer a view: built again
    reference = _logits(model, IDS)
    fuse_projections(lm)
    assert attention.qkv_proj is not fused
    torch.testing.assert_close(_logits(model, IDS), reference)

    unfuse_projections(lm)
    assert not hasattr(attention, "qkv_proj") and not hasattr(lm.model.layers[0].mlp, "gate_up_proj")
    assert model.state_dict().keys() == stock.state_dict().keys()
    model.load_state_dict(_random_state(model))  # no fused entries expected any more


def test_only_plain_or_int8_linears_alike_are_fused(stock):
    pytest.importorskip("torchao")
    from openowl.infer.quantize import Int8WeightOnlyLinear, quantize

    model = copy.deepcopy(stock)
    lm = model.language_model
    lm.model.layers[0].self_attn.k_proj.to(torch.float64)
    assert fuse_projections(lm) == 2 * lm.config.num_hidden_layers - 1  # layer 0's attention: mixed dtypes
    assert type(lm.model.layers[0].self_attn).__name__ == "LlamaAttention"

    model = copy.deepcopy(stock).to(torch.bfloat16)
    fuse_projections(model.language_model)
    quantize(model, "int8")  # unfuses first: no unquantized fused copy is left behind
    attention = model.language_model.model.layers[0].self_attn
    assert not hasattr(attention, "qkv_proj") and type(attention.q_proj) is Int8WeightOnlyLinear
    state = {k: v.clone() for k, v in model.state_dict().items()}
    separate = _logits(model, IDS)
    assert fuse_projections(model.language_model) == 2 * model.language_model.config.num_hidden_layers
    fused, mlp = attention.qkv_proj, model.language_model.model.layers[0].mlp.gate_up_proj
    assert type(fused) is Int8WeightOnlyLinear and type(mlp) is Int8WeightOnlyLinear
    assert fused.scale.shape == (fused.out_features,) and attention.v_proj.scale.data_ptr() > fused.scale.data_ptr()
    assert attention.q_proj.weight.data_ptr() == fused.weight.data_ptr()  # the parts are views: no second copy
    torch.testing.assert_close(_logits(model, IDS), separate)  # bf16: the kernels give each output the same sum
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    changed = {k: v.clone() for k, v in state.items()}
    changed["language_model.model.layers.0.self_attn.k_proj.scale"] *= 2
    model.load_state_dict(changed)  # loading into the parts reaches the fused scales
    k_rows = slice(attention.q_proj.out_features, attention.q_proj.out_features + attention.k_proj.out_features)
    assert torch.equal(fused.scale[k_rows], changed["language_model.model.layers.0.self_attn.k_proj.scale"])
