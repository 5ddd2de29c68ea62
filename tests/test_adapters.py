"""Reading PEFT adapters: 4.x per-expert adapters, and the clear refusal of what is not supported.

Per-expert adapters (``experts.<e>.w1``/``gate_proj``, ...) are built by hand. For Mixtral and
Qwen3-MoE (which PEFT converts, Qwen3-MoE standing for the Qwen2-MoE group) the patched model must
match PEFT's own conversion of the same files; for Qwen2-MoE (which PEFT 0.21 leaves unconverted:
its ``gate_proj``/``up_proj`` names land on the shared expert) and Phi-MoE (never converted) it must
match a model whose weights have the LoRA deltas merged in, here with per-expert ranks and a
different alpha for up than for gate. Refused adapters must leave the loaded ones working.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from test_models import tiny_model
from test_patch import ADAPTERS, assert_rows_match, batch_ids, make_peft_adapters, peft_adapters  # noqa: F401

from torch_moe_lora import patch_model
from torch_moe_lora.adapters import load_adapter_files, read_adapter
from torch_moe_lora.models import FAMILIES, find_moe_blocks
from torch_moe_lora.reference import gate_rows_ref

PEFT_CONVERTS = {"mixtral": True, "qwen3_moe": True, "qwen2_moe": False, "phimoe": False}
RANK, ALPHA = 3, 4
# Only where PEFT does not convert: its conversion ignores per-module patterns, and with use_rslora
# it scales the joined gate_up by 2 alpha / sqrt(2 r) instead of alpha / sqrt(r).
PATTERNS = {"rank_pattern": {"experts.1.{gate}": 4}, "alpha_pattern": {"{up}": 3, "{down}": 6}}
RSLORA = {"qwen2_moe"}


def projection_names(family: str) -> dict[str, str]:
    """role -> the 4.x per-expert module name (``w1``, ``gate_proj``, ...)."""
    return {role: name for name, role in FAMILIES[family].legacy.roles.items()}


def legacy_adapter(family: str, patterns: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A 4.x-style adapter: per-expert gate/up/down LoRAs on every MoE block, plus q_proj; with
    ``patterns``, per-expert ranks, per-projection alphas (and rsLoRA for ``RSLORA`` families)."""
    names = projection_names(family)
    config = dict(peft_type="LORA", r=RANK, lora_alpha=ALPHA, target_modules=[*names.values(), "q_proj"])
    if patterns:
        config.update({kind: {p.format(**names): v for p, v in pattern.items()} for kind, pattern in PATTERNS.items()})
        config["use_rslora"] = family in RSLORA
    rank_pattern = config.get("rank_pattern", {})
    generator = torch.Generator().manual_seed(7)
    state_dict = {}
    model = tiny_model(family)
    for block in find_moe_blocks(model):
        num_experts, hidden, inter = block.spec.w2(block.experts).shape
        layer = block.name.rsplit(".", 1)[0]
        for expert in range(num_experts):
            for role, name in names.items():
                rank = rank_pattern.get(f"experts.{expert}.{name}", RANK)
                fan_in, fan_out = (inter, hidden) if role == "down" else (hidden, inter)
                key = f"base_model.model.{layer}.{FAMILIES[family].legacy.block_attr}.experts.{expert}.{name}"
                state_dict[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
                state_dict[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
        q_proj = model.get_submodule(f"{layer}.self_attn.q_proj")
        state_dict[f"base_model.model.{layer}.self_attn.q_proj.lora_A.weight"] = torch.randn(RANK, q_proj.in_features)
        state_dict[f"base_model.model.{layer}.self_attn.q_proj.lora_B.weight"] = torch.randn(q_proj.out_features, RANK)
    return state_dict, config


def save_adapter(path, state_dict: dict, config: dict) -> str:
    path.mkdir()
    save_file(state_dict, str(path / "adapter_model.safetensors"))
    full = LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}).to_dict()
    full["peft_type"] = "LORA"
    (path / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in full.items() if k != "runtime_config"}, default=list)
    )
    return str(path)


def merged_model(family: str, state_dict: dict, config: dict):
    """The base model with every delta ``scale * B A`` of the per-expert adapter added to its weights."""
    model = tiny_model(family)
    rank_pattern, alpha_pattern = config.get("rank_pattern", {}), config.get("alpha_pattern", {})

    def delta(key: str) -> torch.Tensor:
        rank = next((v for p, v in rank_pattern.items() if key.endswith(p)), RANK)
        alpha = next((v for p, v in alpha_pattern.items() if key.endswith(p)), ALPHA)
        base = f"base_model.model.{key}"
        scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        return scale * state_dict[f"{base}.lora_B.weight"] @ state_dict[f"{base}.lora_A.weight"]

    names = projection_names(family)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            w13, w2 = block.spec.w13(block.experts), block.spec.w2(block.experts)
            gate_rows = gate_rows_ref(w13.shape[1], gated=True, interleaved=block.spec.interleaved)
            layer = block.name.rsplit(".", 1)[0]
            for expert in range(w13.shape[0]):
                prefix = f"{layer}.{FAMILIES[family].legacy.block_attr}.experts.{expert}"
                w13[expert, gate_rows] += delta(f"{prefix}.{names['gate']}")
                w13[expert, ~gate_rows] += delta(f"{prefix}.{names['up']}")
                w2[expert] += delta(f"{prefix}.{names['down']}")
            model.get_submodule(f"{layer}.self_attn.q_proj").weight += delta(f"{layer}.self_attn.q_proj")
    return model


@pytest.mark.parametrize("family", list(PEFT_CONVERTS))
def test_legacy_per_expert_adapter(family, tmp_path):
    converts = PEFT_CONVERTS[family]
    state_dict, config = legacy_adapter(family, patterns=not converts)
    path = save_adapter(tmp_path / "legacy", state_dict, config)
    if converts:
        reference = PeftModel.from_pretrained(tiny_model(family), path).eval()
    else:
        reference = merged_model(family, state_dict, config)
    joint_path, joint_model = make_peft_adapters(family, tmp_path, {"a": ADAPTERS["a"]})["a"]
    models = {"legacy": reference, "a": joint_model, None: tiny_model(family)}
    ids = batch_ids(3)

    def check(model, handle, rows, what):
        ref = torch.stack([models[n](input_ids=ids[i : i + 1]).logits[0] for i, n in enumerate(rows)])
        with handle.adapters(rows):
            out = model(ids).logits
        assert_rows_match(out, ref, rows, f"{family} {what}")
        assert (ref[0] - models[None](input_ids=ids[:1]).logits[0]).abs().max() > 0.05 * ref.abs().max()

    with torch.no_grad():
        model = tiny_model(family)
        handle = patch_model(model, {"legacy": path, "a": joint_path})
        assert next(iter(handle._tables.values())).weights.split_gate_up
        check(model, handle, ["legacy", "a", None], "per-expert adapter, separate gate/up slots")

        model = tiny_model(family)
        handle = patch_model(model, {"a": joint_path}, max_loras=2, max_rank=8)
        handle.load_adapter("legacy", path)
        assert not next(iter(handle._tables.values())).weights.split_gate_up
        check(model, handle, ["a", None, "legacy"], "per-expert adapter joined into gate_up")

        model = tiny_model(family)
        handle = patch_model(model, {"a": joint_path}, max_loras=2)
        with pytest.raises(ValueError, match=r"'legacy': rank \d+ \(its per-expert gate and up LoRAs joined"):
            handle.load_adapter("legacy", path)


def _edit(state_dict: dict, config: dict, add=None, drop=(), replace=None, **config_changes):
    state_dict = {k: v for k, v in state_dict.items() if k not in drop}
    state_dict.update(add or {})
    for key, value in (replace or {}).items():
        state_dict[key] = value
    return state_dict, {**config, **config_changes}


def _refusals(sd: dict, cfg: dict, hidden: int, vocab: int, max_rank: int):
    layer = "base_model.model.model.layers.0"
    q_a, gate_up_a = f"{layer}.self_attn.q_proj.lora_A.weight", f"{layer}.mlp.experts.base_layer.lora_A.weight"
    pair = lambda module, out=hidden, r=4: {  # noqa: E731
        f"{module}.lora_A.weight": torch.zeros(r, hidden),
        f"{module}.lora_B.weight": torch.zeros(out, r),
    }
    return {
        "DoRA config": (_edit(sd, cfg, use_dora=True), NotImplementedError, r"DoRA \(use_dora\)"),
        "DoRA weights": (
            _edit(sd, cfg, add={f"{layer}.self_attn.q_proj.lora_magnitude_vector": torch.ones(hidden)}),
            NotImplementedError, "DoRA",
        ),
        "lora_bias config": (_edit(sd, cfg, lora_bias=True), NotImplementedError, "LoRA bias"),
        "lora_bias weights": (
            _edit(sd, cfg, add={f"{layer}.self_attn.q_proj.lora_B.bias": torch.zeros(hidden)}),
            NotImplementedError, "LoRA bias",
        ),
        "embedding weights": (
            _edit(sd, cfg, add={"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, vocab)}),
            NotImplementedError, "LoRA on embeddings",
        ),
        "embedding module": (
            _edit(sd, cfg, add=pair("base_model.model.model.embed_tokens")), NotImplementedError, "embeddings",
        ),
        "lm_head": (_edit(sd, cfg, add=pair("base_model.model.lm_head", vocab)), NotImplementedError, "lm_head"),
        "router": (_edit(sd, cfg, add=pair(f"{layer}.mlp.gate", 4)), NotImplementedError, "MoE router"),
        "modules_to_save": (_edit(sd, cfg, modules_to_save=["lm_head"]), NotImplementedError, "modules_to_save"),
        "other PEFT type": (_edit(sd, cfg, peft_type="IA3"), NotImplementedError, "PEFT type 'IA3'"),
        "unknown module": (
            _edit(sd, cfg, add=pair(f"{layer}.self_attn.nope")), ValueError, "self_attn.nope: matches no module",
        ),
        "linear shape": (
            _edit(sd, cfg, replace={q_a: torch.zeros(4, hidden + 1)}), ValueError, "do not match the model",
        ),
        "experts shape": (
            _edit(sd, cfg, replace={gate_up_a: torch.zeros(15, hidden)}), ValueError, "does not match the parameter",
        ),
        "rank against config": (_edit(sd, cfg, r=3), ValueError, "the config gives r=3"),
        "missing lora_B": (
            _edit(sd, cfg, drop=[f"{layer}.self_attn.q_proj.lora_B.weight"]), ValueError, "lora_B missing",
        ),
        "not a LoRA key": (
            _edit(sd, cfg, add={"base_model.model.model.norm.weight": torch.ones(hidden)}), ValueError,
            "not a LoRA A/B weight",
        ),
        "rank above max_rank": ((sd, cfg), ValueError, f"rank 4 > the tables' max_rank {max_rank}"),
    }  # fmt: skip


def test_refusals_leave_loaded_adapters_working(peft_adapters):  # noqa: F811
    family = "qwen3_moe"
    made = peft_adapters(family)
    state_dict, config = load_adapter_files(made["a"][0])
    model = tiny_model(family)
    handle = patch_model(model, {"c": made["c"][0]}, max_loras=2)
    ids, rows = batch_ids(2), ["c", None]
    with torch.no_grad(), handle.adapters(rows):
        before = model(ids).logits
    cases = _refusals(state_dict, config, model.config.hidden_size, model.config.vocab_size, handle.max_rank)
    for what, (source, error, message) in cases.items():
        with pytest.raises(error, match=f"adapter 'bad': .*{message}"):
            handle.load_adapter("bad", source)
        assert handle.adapter_names == ["c"], what
    with torch.no_grad(), handle.adapters(rows):
        assert torch.equal(model(ids).logits, before)
    assert all(not linear.lora_scale[1] for _, linear in handle._linears.values())
    assert handle.load_adapter("c2", made["c"][0]) == 1


def test_convolution_and_pickle_are_refused(tmp_path):
    model = tiny_model("qwen3_next")
    conv = "base_model.model.model.layers.0.linear_attn.conv1d"
    source = (
        {f"{conv}.lora_A.weight": torch.zeros(2, 4), f"{conv}.lora_B.weight": torch.zeros(4, 2)},
        {"peft_type": "LORA", "r": 2},
    )
    with pytest.raises(
        NotImplementedError, match=r"adapter 'conv': LoRA on convolutions \(model.layers.0.linear_attn.conv1d"
    ):
        read_adapter("conv", source, model, find_moe_blocks(model))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a pickle and is not read"):
        read_adapter("pickled", tmp_path, model, find_moe_blocks(model))
