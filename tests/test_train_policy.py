"""Training policies on the tiny model: the exact trainable parameters of every preset, where gradients go, LoRA
starting as the identity, optimizer steps touching only what trains; and the exports (LoRA merge, adapter round
trip, the upstream single-file layout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT
from safetensors.torch import load_file

from openowl import OwlForConditionalGeneration, get_preset
from openowl.checkpoint import CheckpointError
from openowl.model.lora import has_lora, merge_lora, merged_state_dict
from openowl.train.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    save_adapter,
    save_upstream,
)
from openowl.train.policy import (
    MODEL_PARTS,
    POLICIES,
    LoraSettings,
    TrainPolicy,
    apply_policy,
    backward_parts,
    get_policy,
    is_checkpointing,
    part_of,
    store_frozen_linears,
    trainable_parameters,
    trainable_parts,
)

# --- the tiny model's parameters, written out from the module structure -------------------------

LAYERS = (0, 1)
VISION_LAYER_MODULES = (
    "input_layernorm self_attn.query_key_value self_attn.dense post_attention_layernorm mlp.fc1 mlp.fc2"
)
ABSTRACTOR_LAYER_MODULES = (
    "attention.query attention.key attention.value output.out_proj output.norm2 "
    "output.mlp.w1 output.mlp.w2 output.mlp.w3 output.mlp.ffn_ln norm1 normk"
)
LLM_LAYER_MODULES = (
    "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.o_proj "
    "mlp.gate_proj mlp.up_proj mlp.down_proj input_layernorm post_attention_layernorm"
)


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


VISION = {
    "vision_model.embeddings.cls_token",
    "vision_model.embeddings.patch_embed.weight",
    "vision_model.embeddings.position_embedding",
    *_wb("vision_model.embeddings.pre_layernorm"),
    *_wb("vision_model.post_layernorm"),
    *(
        name
        for i in LAYERS
        for module in VISION_LAYER_MODULES.split()
        for name in _wb(f"vision_model.encoder.layers.{i}.{module}")
    ),
}
ABSTRACTOR = {
    "query_tokens",
    "abstractor.vit_eos",
    *_wb("abstractor.visual_fc"),
    *(
        name
        for i in LAYERS
        for module in ABSTRACTOR_LAYER_MODULES.split()
        for name in _wb(f"abstractor.encoder.layers.{i}.crossattention.{module}")
    ),
}
LLM = {
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
    *(f"language_model.model.layers.{i}.{module}.weight" for i in LAYERS for module in LLM_LAYER_MODULES.split()),
}
LORA_QV = {
    f"language_model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
    for i in LAYERS
    for proj in ("q_proj", "v_proj")
    for ab in "AB"
}
# Counted by hand (width 64 everywhere, ViT MLP 128, abstractor MLP 176, LLaMA MLP 160, vocabulary 32000).
# A vision layer: 2 LayerNorms + fused qkv (192×64 + 192) + dense + fc1 (128×64 + 128) + fc2 (64×128 + 64).
VISION_LAYER_COUNT = 2 * 128 + 12_480 + 4_160 + 8_320 + 8_256
# The vision model: cls + patch conv 64·3·14·14 + 17 positions ·64 + pre/post LayerNorms + 2 layers.
VISION_COUNT = 64 + 37_632 + 1_088 + 2 * 128 + 2 * VISION_LAYER_COUNT
# An abstractor layer: query/key/value/out_proj 4 × (64×64 + 64) + w1, w3 2 × (176×64 + 176) + w2 (64×176 + 64)
# + ffn_ln 2·176 + norm1, normk, norm2 3 × 128.
ABSTRACTOR_LAYER_COUNT = 4 * 4_160 + 2 * 11_440 + 11_328 + 352 + 3 * 128
# The abstractor part: query_tokens 64·64 + vit_eos 64 + visual_fc (64×64 + 64) + 2 layers.
ABSTRACTOR_COUNT = 4_096 + 64 + 4_160 + 2 * ABSTRACTOR_LAYER_COUNT
# LLaMA: embeddings and lm_head 2 × 32000·64 + final norm 64 + 2 layers × (4 · 64·64 + 3 · 64·160 + 2 · 64).
LLM_COUNT = 2 * 2_048_000 + 64 + 2 * (4 * 4_096 + 3 * 10_240 + 2 * 64)
LORA_COUNT = 4 * (8 * 64 + 64 * 8)  # q and v in 2 layers, A (r × 64) and B (64 × r)

EXPECTED = {
    "stage1": (VISION | ABSTRACTOR, VISION_COUNT + ABSTRACTOR_COUNT),
    "stage1-abstractor": (ABSTRACTOR, ABSTRACTOR_COUNT),
    "stage2": (LORA_QV, LORA_COUNT),
    "stage2-abstractor": (LORA_QV | ABSTRACTOR, LORA_COUNT + ABSTRACTOR_COUNT),
    "full-llm": (LLM, LLM_COUNT),
}
NO_DROPOUT = LoraSettings(dropout=0.0)


# --- helpers -------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, preset: str = "tiny") -> OwlForConditionalGeneration:
    """The tiny model with every zero-initialised tensor (queries, CLS, positions, LayerNorm biases) made random,
    and no attention dropout, so that a train-mode forward is deterministic."""
    config = get_preset(preset)
    config.abstractor.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    model = OwlForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.02)
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples of BOS, one image's 65 placeholders and 8 text tokens; the loss is on the text."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (2, 8), generator=gen)
    input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 65), -1), text], dim=1)  # (2, 74)
    return {
        "input_ids": input_ids,
        "pixel_values": torch.randn(2, 3, 56, 56, generator=gen),
        "labels": input_ids.masked_fill(input_ids < 0, -100),
    }


def logits(model: OwlForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits


def randomize_lora_b(model: OwlForConditionalGeneration) -> None:
    """LoRA starts as the identity (B = 0); give B values so that the adapter changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)


# --- the policies --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_preset_trains_exactly_its_parameters(name: str) -> None:
    model = apply_policy(tiny_model(), get_policy(name))
    names, count = EXPECTED[name]
    trainable = trainable_parameters(model)
    assert set(trainable) == names
    assert sum(trainable.values()) == count
    assert trainable_parts(POLICIES[name]) == {part_of(n) for n in names}


def test_hand_counts_cover_the_whole_model() -> None:
    model = tiny_model()
    assert {name for name, _ in model.named_parameters()} == VISION | ABSTRACTOR | LLM
    assert sum(p.numel() for p in model.parameters()) == VISION_COUNT + ABSTRACTOR_COUNT + LLM_COUNT


def test_presets_match_the_spec() -> None:
    stage2 = POLICIES["stage2"]
    assert (stage2.vision, stage2.abstractor, stage2.language_model) == ("frozen", "frozen", "lora")
    assert stage2.lora == LoraSettings(r=8, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"))
    assert POLICIES["stage2-abstractor"].abstractor == "full"
    assert backward_parts(POLICIES["stage1"]) == set(MODEL_PARTS)  # through the frozen LLM to the abstractor
    assert backward_parts(POLICIES["stage2"]) == {"language_model"}
    assert backward_parts(POLICIES["stage2-abstractor"]) == {"abstractor", "language_model"}


def test_every_parameter_of_the_video_model_has_a_part() -> None:
    model = apply_policy(tiny_model(preset="tiny-video"), POLICIES["stage1"])
    trainable = set(trainable_parameters(model))
    assert "temporal_query_tokens" in trainable
    assert "abstractor.temporal_visual_fc.weight" in trainable
    assert "vision_model.encoder.layers.0.temporal.down_proj.weight" in trainable
    assert not any(name.startswith("language_model.") for name in trainable)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stage1_gradients_reach_vision_and_abstractor_but_not_the_llm(checkpointing: bool) -> None:
    model = apply_policy(tiny_model(), POLICIES["stage1"], gradient_checkpointing=checkpointing).train()
    assert model.vision_model.encoder.gradient_checkpointing is checkpointing
    assert model.abstractor.encoder.gradient_checkpointing is checkpointing
    assert is_checkpointing(model.language_model) is checkpointing
    model(**batch()).loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grads[name] is None for name in LLM)
    assert all(grads[name] is not None and grads[name].any() for name in VISION | ABSTRACTOR)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        policy = TrainPolicy("frozen", "full", "lora", NO_DROPOUT)  # stage2-abstractor, deterministic
        model = apply_policy(tiny_model(), policy, gradient_checkpointing=checkpointing).train()
        randomize_lora_b(model)
        model(**batch()).loss.backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.requires_grad})
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_checkpointing_follows_the_parts_backprop_runs_through() -> None:
    model = apply_policy(tiny_model(), POLICIES["stage2"], gradient_checkpointing=True)
    assert not model.vision_model.encoder.gradient_checkpointing
    assert not model.abstractor.encoder.gradient_checkpointing
    assert is_checkpointing(model.language_model)
    apply_policy(model, POLICIES["full-llm"])  # checkpointing off: switched off everywhere
    assert not is_checkpointing(model.language_model)


def test_frozen_parts_build_no_autograd_graph() -> None:
    pixels = batch()["pixel_values"]
    model = apply_policy(tiny_model(), POLICIES["stage2"]).train()
    assert model.get_image_features(pixels).grad_fn is None
    model = apply_policy(tiny_model(), POLICIES["stage2-abstractor"]).train()
    assert model.vision_model(pixels).grad_fn is None
    assert model.get_image_features(pixels).grad_fn is not None


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_frozen_linears_stored_in_bf16_give_the_same_training_step(name: str) -> None:
    """Weights that bf16 holds exactly (as read from a bf16 checkpoint) give bit-identical bf16-autocast losses and
    gradients whether the frozen Linears keep them in float32 (cast at every call) or in bf16."""
    results = []
    for store in (False, True):
        model = tiny_model().to(torch.bfloat16).float()  # float32 weights with bf16 values
        policy = dataclasses.replace(POLICIES[name], lora=NO_DROPOUT)
        apply_policy(model, policy).train()
        randomize_lora_b(model)
        converted = store_frozen_linears(model, torch.bfloat16) if store else []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch()).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, converted, model))
    (loss32, grads32, _, _), (loss16, grads16, converted, model) = results
    assert torch.equal(loss16, loss32)
    assert grads16.keys() == grads32.keys() and all(torch.equal(grads16[n], grads32[n]) for n in grads32)
    frozen_linear = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    }
    assert "language_model.lm_head" in frozen_linear  # the tiny preset's head is not tied to the embeddings
    assert set(converted) == frozen_linear and converted
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.language_model.get_input_embeddings().weight.dtype == torch.float32
    tied = tiny_model().to(torch.bfloat16).float()
    tied.language_model.lm_head.weight = tied.language_model.get_input_embeddings().weight
    apply_policy(tied, POLICIES[name])
    assert "language_model.lm_head" not in store_frozen_linears(tied, torch.bfloat16)  # shares the embeddings
    assert tied.language_model.lm_head.weight.dtype == torch.float32
    untouched = tiny_model()  # float32 values bf16 can't hold: nothing is converted
    apply_policy(untouched, POLICIES[name])
    assert store_frozen_linears(untouched, torch.bfloat16) == []


def test_stage2_lora_starts_as_the_identity() -> None:
    inputs = batch()
    model = tiny_model()
    before = logits(model, inputs)
    apply_policy(model, POLICIES["stage2"])
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("name", list(POLICIES))
def test_optimizer_steps_change_only_trainable_parameters(name: str) -> None:
    model = apply_policy(tiny_model(), POLICIES[name], gradient_checkpointing=True).train()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for step in range(3):
        optimizer.zero_grad()
        model(**batch(step)).loss.backward()
        optimizer.step()
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, start[key])}
    assert changed == set(trainable_parameters(model))


def test_lora_model_keeps_the_released_key_names() -> None:
    model = tiny_model()
    released = list(model.state_dict())
    apply_policy(model, POLICIES["stage2"])
    keys = list(model.state_dict())
    assert [key for key in keys if ".lora_" not in key] == released
    assert set(keys) - set(released) == LORA_QV
    randomize_lora_b(model)
    other = apply_policy(tiny_model(seed=1), POLICIES["stage2"])
    other.load_state_dict(model.state_dict())  # strict: the same names load back
    inputs = batch()
    assert torch.equal(logits(other, inputs), logits(model, inputs))


def test_lora_on_the_vision_side_targets_its_own_linear_names() -> None:
    with pytest.raises(ValueError, match="query_key_value"):
        apply_policy(tiny_model(), TrainPolicy("lora", "frozen", "frozen"))  # q_proj/v_proj are LLaMA names
    policy = TrainPolicy("lora", "lora", "frozen", LoraSettings(r=4, targets=("query_key_value", "query", "value")))
    trainable = set(trainable_parameters(apply_policy(tiny_model(), policy)))
    vision = {f"vision_model.encoder.layers.{i}.self_attn.query_key_value.lora_{ab}.default.weight"
              for i in LAYERS for ab in "AB"}  # fmt: skip
    abstractor = {f"abstractor.encoder.layers.{i}.crossattention.attention.{m}.lora_{ab}.default.weight"
                  for i in LAYERS for m in ("query", "value") for ab in "AB"}  # fmt: skip
    assert trainable == vision | abstractor


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        TrainPolicy("frozen", "partial", "full")
    with pytest.raises(KeyError, match="stage2"):
        get_policy("stage3")
    with pytest.raises(ValueError, match="qproj"):
        apply_policy(tiny_model(), TrainPolicy("frozen", "frozen", "lora", LoraSettings(targets=("q_proj", "qproj"))))
    model = apply_policy(tiny_model(), POLICIES["stage2"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_policy(model, POLICIES["stage2"])
    with pytest.raises(ValueError, match="belongs to no part"):
        part_of("lm_head.weight")


def test_lora_adapters_are_float32_on_a_bfloat16_model() -> None:
    model = apply_policy(tiny_model().to(torch.bfloat16), POLICIES["stage2"])
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert {dtypes[name] for name in LORA_QV} == {torch.float32}
    randomize_lora_b(model)
    assert logits(model, batch()).dtype == torch.bfloat16
    merge_lora(model)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}


# --- exports -------------------------------------------------------------------------------------


@pytest.fixture
def lora_model() -> OwlForConditionalGeneration:
    """Stage 2 on the tiny model, with an adapter that changes the output."""
    model = apply_policy(tiny_model(), POLICIES["stage2"])
    randomize_lora_b(model)
    return model


def test_merge_gives_the_lora_model_logits_and_the_released_keys(lora_model: OwlForConditionalGeneration) -> None:
    inputs = batch()
    base = logits(tiny_model(), inputs)
    with_lora = logits(lora_model, inputs)
    assert not torch.allclose(with_lora, base, atol=1e-3)  # the adapter does something
    expected_state = merged_state_dict(lora_model)
    merge_lora(lora_model)
    torch.testing.assert_close(logits(lora_model, inputs), with_lora, atol=1e-5, rtol=0)
    assert not has_lora(lora_model) and not hasattr(lora_model, "peft_config")
    state = lora_model.state_dict()
    assert list(state) == list(tiny_model().state_dict())
    assert state.keys() == expected_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected_state[key], atol=1e-7, rtol=0, msg=key)


def test_save_upstream_writes_the_released_layout(lora_model: OwlForConditionalGeneration, tmp_path: Path) -> None:
    folder = tmp_path / "upstream"
    tiny_model(seed=3).save_pretrained(folder)  # an older safetensors save in the folder must not win
    merged = merged_state_dict(lora_model)
    save_upstream(lora_model, folder)
    assert has_lora(lora_model)  # the model itself is left as it was
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    written = torch.load(folder / "pytorch_model.bin", weights_only=True)
    released = torch.load(CHECKPOINT / "pytorch_model.bin", weights_only=True, mmap=True)
    assert written.keys() == {key for key in released if not key.endswith(".rotary_emb.inv_freq")}
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}
    loaded = OwlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, merged[key].to(torch.bfloat16).float()), key


def test_adapter_round_trip(lora_model: OwlForConditionalGeneration, tmp_path: Path) -> None:
    inputs = batch()
    expected = logits(lora_model, inputs)
    save_adapter(lora_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    stored = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert set(stored) == {"base_model.model." + key.replace(".default.", ".") for key in LORA_QV}

    fresh = tiny_model()  # same seed: the same base weights
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, inputs), expected)
    assert all(param.requires_grad for param in fresh.parameters())  # the flags it had, adapters trainable

    resumed = apply_policy(tiny_model(), POLICIES["stage2"])  # LoRA layers already there: weights replaced
    load_adapter(resumed, tmp_path)
    assert torch.equal(logits(resumed, inputs), expected)


def test_adapter_errors(lora_model: OwlForConditionalGeneration, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_model(), tmp_path)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_adapter(tiny_model(), tmp_path)
    save_adapter(lora_model, tmp_path)
    other_rank = apply_policy(tiny_model(), TrainPolicy("frozen", "frozen", "lora", LoraSettings(r=4)))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapter(other_rank, tmp_path)
    k_only = TrainPolicy("frozen", "frozen", "lora", LoraSettings(targets=("k_proj",)))
    other_targets = apply_policy(tiny_model(), k_only)
    with pytest.raises(CheckpointError, match="does not match"):
        load_adapter(other_targets, tmp_path)
