"""Reading PEFT adapters: 4.x per-expert adapters, and the clear refusal of what is not supported.

Per-expert adapters (``experts.<e>.w1``/``gate_proj``, ...) are built by hand
(``utils.legacy_adapter``). For Mixtral and Qwen3-MoE (which PEFT converts, Qwen3-MoE standing for
the Qwen2-MoE group) the patched model must match PEFT's own conversion of the same files; for
Qwen2-MoE (which PEFT 0.21 leaves unconverted: its ``gate_proj``/``up_proj`` names land on the
shared expert) and Phi-MoE (never converted) it must match a model whose weights have the LoRA
deltas merged in, here with per-expert ranks and a different alpha for up than for gate. Refused
adapters must leave the loaded ones working.

Errors at the public API: a corrupt adapter among several (truncated safetensors, bad JSON, a string
``lora_alpha``, ...) is named with its path; config fields of the wrong type or value are named with
their value; ``name`` and ``source`` are checked. Weights of modules the config does not target are
ignored with a warning, as ``PeftModel.from_pretrained`` ignores them, and the logits match it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from utils import (
    ADAPTERS,
    LEGACY_ALPHA,
    LEGACY_RANK,
    assert_rows_match,
    batch_ids,
    legacy_adapter,
    make_peft_adapters,
    projection_names,
    save_adapter,
    tiny_model,
)

from torch_moe_lora import patch_model
from torch_moe_lora.adapters import load_adapter_files, read_adapter
from torch_moe_lora.models import FAMILIES, find_moe_blocks
from torch_moe_lora.reference import gate_rows_ref

# Whether PEFT converts a family's 4.x per-expert adapters itself (the reference is then PEFT's
# conversion; else the merged model, and the adapter carries ``utils.LEGACY_PATTERNS``).
PEFT_CONVERTS = {"mixtral": True, "qwen3_moe": True, "qwen2_moe": False, "phimoe": False}


def merged_model(family: str, state_dict: dict, config: dict):
    """The base model with every delta ``scale * B A`` of the per-expert adapter added to its weights."""
    model = tiny_model(family)
    rank_pattern, alpha_pattern = config.get("rank_pattern", {}), config.get("alpha_pattern", {})

    def delta(key: str) -> torch.Tensor:
        rank = next((v for p, v in rank_pattern.items() if key.endswith(p)), LEGACY_RANK)
        alpha = next((v for p, v in alpha_pattern.items() if key.endswith(p)), LEGACY_ALPHA)
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
    """Name -> (source, error, message). Modules PEFT does not support are refused where the config
    targets them (elsewhere their weights are ignored, as PEFT ignores them)."""
    layer = "base_model.model.model.layers.0"
    also = lambda *names: {"target_modules": [*cfg["target_modules"], *names]}  # noqa: E731
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
            _edit(
                sd, cfg, add={"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, vocab)},
                **also("embed_tokens"),
            ),
            NotImplementedError, "LoRA on embeddings",
        ),
        "embedding module": (
            _edit(sd, cfg, add=pair("base_model.model.model.embed_tokens"), **also("embed_tokens")),
            NotImplementedError, "embeddings",
        ),
        "lm_head": (
            _edit(sd, cfg, add=pair("base_model.model.lm_head", vocab), **also("lm_head")), NotImplementedError,
            "lm_head",
        ),
        "router": (
            _edit(sd, cfg, add=pair(f"{layer}.mlp.gate", 4), **also("gate")), NotImplementedError, "MoE router",
        ),
        "modules_to_save": (_edit(sd, cfg, modules_to_save=["lm_head"]), NotImplementedError, "modules_to_save"),
        "other PEFT type": (_edit(sd, cfg, peft_type="IA3"), NotImplementedError, "PEFT type 'IA3'"),
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


def test_refusals_leave_loaded_adapters_working(peft_adapters):
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
        {"peft_type": "LORA", "r": 2, "target_modules": ["conv1d"]},
    )
    with pytest.raises(
        NotImplementedError, match=r"adapter 'conv': LoRA on convolutions \(model.layers.0.linear_attn.conv1d"
    ):
        read_adapter("conv", source, model, find_moe_blocks(model))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a pickle and is not read"):
        read_adapter("pickled", tmp_path, model, find_moe_blocks(model))


# --- errors at the public API, and weights PEFT ignores ------------------------------------------


def _rewrite_config(path, **changes) -> None:
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def _truncate_weights(path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _integer_lora_a(path) -> None:
    weights = str(path / "adapter_model.safetensors")
    state_dict = load_file(weights)
    key = next(k for k in state_dict if k.endswith("q_proj.lora_A.weight"))
    save_file({**state_dict, key: state_dict[key].to(torch.int64)}, weights)


# How an adapter directory is broken -> (break it, error, the file the error names ("": the directory),
# message, the chained exception of the library that found it).
CORRUPTIONS = {
    "truncated weights": (
        _truncate_weights, ValueError, "adapter_model.safetensors", "not a readable safetensors file", SafetensorError,
    ),
    "invalid JSON": (
        lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), ValueError, "adapter_config.json",
        "not valid JSON", json.JSONDecodeError,
    ),
    "config not an object": (
        lambda p: (p / "adapter_config.json").write_text("[4]"), TypeError, "adapter_config.json",
        "holds a JSON list, expected an object", None,
    ),
    "string lora_alpha": (
        lambda p: _rewrite_config(p, lora_alpha="8"), TypeError, "",
        "config field lora_alpha='8': expected a finite number", None,
    ),
    "string r": (
        lambda p: _rewrite_config(p, r="4"), TypeError, "", "config field r='4': expected a positive int", None,
    ),
    "integer tensor": (
        _integer_lora_a, TypeError, "", "q_proj.lora_A.weight: expected a floating-point tensor, got I64", None,
    ),
    "no weights file": (
        lambda p: (p / "adapter_model.safetensors").unlink(), FileNotFoundError, "",
        "no adapter_model.safetensors", None,
    ),
    "no directory": (shutil.rmtree, FileNotFoundError, "", "the path does not exist", None),
}  # fmt: skip


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_adapter_among_several_is_named(corruption, peft_adapters, tmp_path):
    """A broken adapter among good ones: the error names it, its directory (or the file in it) and
    what is wrong, and chains the exception of the library that found it."""
    made = peft_adapters("qwen3_moe")
    bad = tmp_path / "bad"
    shutil.copytree(made["a"][0], bad)
    corrupt, error, file, message, cause = CORRUPTIONS[corruption]
    corrupt(bad)
    where = re.escape(str(bad / file if file else bad))
    with pytest.raises(error, match=rf"^adapter 'bad' \({where}\): .*{message}") as raised:
        patch_model(tiny_model("qwen3_moe"), {"good": made["b"][0], "bad": str(bad), "other": made["c"][0]})
    print(raised.value)
    if cause is not None:
        assert isinstance(raised.value.__cause__, cause), repr(raised.value.__cause__)


# A change to a config PEFT saved -> (error, message); field errors name the field and its value.
CONFIG_ERRORS = {
    "r a string": (dict(r="4"), TypeError, "config field r='4': expected a positive int"),
    "r a bool": (dict(r=True), TypeError, "config field r=True: expected a positive int"),
    "r zero": (dict(r=0), ValueError, "config field r=0: expected a positive int"),
    "lora_alpha a string": (dict(lora_alpha="8"), TypeError, "config field lora_alpha='8': expected a finite number"),
    "lora_alpha nan": (dict(lora_alpha=float("nan")), ValueError, "config field lora_alpha=nan"),
    "use_rslora a string": (dict(use_rslora="yes"), TypeError, "config field use_rslora='yes': expected a bool"),
    "rank_pattern a list": (dict(rank_pattern=["q_proj"]), TypeError, r"config field rank_pattern=\['q_proj'\]"),
    "rank_pattern a string rank": (
        dict(rank_pattern={"q_proj": "4"}), TypeError, r"config field rank_pattern=\{'q_proj': '4'\}",
    ),
    "alpha_pattern a bad regex": (dict(alpha_pattern={"(": 2}), ValueError, r"config field alpha_pattern=\{'\(': 2\}"),
    "target_modules a number": (dict(target_modules=3), TypeError, "config field target_modules=3"),
    "target_modules with a number": (
        dict(target_modules=["q_proj", 3]), TypeError, r"config field target_modules=\['q_proj', 3\]",
    ),
    "target_modules a bad regex": (
        dict(target_modules="q_proj("), ValueError, r"config field target_modules='q_proj\('",
    ),
    "target_parameters a string": (
        dict(target_parameters="experts.down_proj"), TypeError, "config field target_parameters='experts.down_proj'",
    ),
    "exclude_modules a number": (dict(exclude_modules=5), TypeError, "config field exclude_modules=5"),
    "layers_to_transform a string": (dict(layers_to_transform="0"), TypeError, "config field layers_to_transform='0'"),
    "layers with a regex": (
        dict(target_modules=".*q_proj", layers_to_transform=[0]), ValueError,
        "PEFT refuses the config: `layers_to_transform` cannot be used when `target_modules` is a str",
    ),
    "no peft_type": (dict(peft_type=None), ValueError, "the config has no peft_type"),
    "no targets": (
        dict(target_modules=None, target_parameters=None), ValueError,
        "the config sets neither target_modules nor target_parameters, and PEFT has no default target_modules for "
        "model type 'qwen3_moe'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_field_errors_name_the_field(case, peft_adapters):
    state_dict, config = load_adapter_files(peft_adapters("qwen3_moe")["a"][0])
    changes, error, message = CONFIG_ERRORS[case]
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}
    model = tiny_model("qwen3_moe")
    with pytest.raises(error, match=f"^adapter 'bad': {message}"):
        read_adapter("bad", (state_dict, config), model, find_moe_blocks(model))


def test_argument_errors_name_the_argument(peft_adapters):
    path = peft_adapters("qwen3_moe")["a"][0]
    state_dict, config = load_adapter_files(path)
    q_a = next(k for k in state_dict if k.endswith("q_proj.lora_A.weight"))
    with_q_a = lambda tensor: ({**state_dict, q_a: tensor}, config)  # noqa: E731
    model = tiny_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    cases = [
        (3, path, TypeError, r"^adapter name must be a non-empty str, got 3 \(int\)"),
        ("", path, ValueError, "^adapter name must be a non-empty str, got ''"),
        ("bad", 42, TypeError, "^adapter 'bad': source must be a PEFT adapter directory .* got int"),
        ("bad", (state_dict,), TypeError, r"^adapter 'bad': source must be .* pair, got a tuple of 1"),
        ("bad", (list(state_dict.items()), config), TypeError, "^adapter 'bad': the state dict must be a mapping"),
        ("bad", (state_dict, list(config.items())), TypeError, "^adapter 'bad': the config must be a LoraConfig"),
        ("bad", ({**state_dict, 3: state_dict[q_a]}, config), TypeError, "^adapter 'bad': state dict key 3"),
        ("bad", with_q_a(state_dict[q_a].numpy()), TypeError, f"^adapter 'bad': {q_a}: expected a torch.Tensor"),
        ("bad", with_q_a(state_dict[q_a].int()), TypeError, "expected a floating-point tensor, got torch.int32"),
        ("bad", with_q_a(state_dict[q_a][0]), ValueError, r"expected a 2-D matrix, got shape \(32,\)"),
    ]  # fmt: skip
    for name, source, error, message in cases:
        with pytest.raises(error, match=message):
            read_adapter(name, source, model, blocks)
    with pytest.raises(TypeError, match="adapter name must be a non-empty str, got 3"):
        patch_model(model, {3: path})


def _lora_weights(model, modules: list[str], rank: int = 2) -> dict[str, torch.Tensor]:
    """Random LoRA weights as PEFT saves them for ``modules``: linears (or a module the model lacks,
    as a ``[32, 32]`` linear), experts (``[E*r, H]``, ``[H, E*r]``), and the embedding's ``lora_embedding_A``."""
    generator = torch.Generator().manual_seed(3)
    hidden, weights = model.config.hidden_size, {}
    for module in modules:
        key = f"base_model.model.{module}"
        if module.endswith("embed_tokens"):
            weights[f"{key}.lora_embedding_A"] = torch.randn(rank, model.config.vocab_size, generator=generator)
            continue
        owner = model.get_submodule(module.removesuffix(".base_layer")) if ".layers.7." not in module else None
        if owner is None or isinstance(owner, nn.Linear):
            fan_in, fan_out = (owner.in_features, owner.out_features) if owner is not None else (32, 32)
            shapes = [(rank, fan_in), (fan_out, rank)]
        else:
            experts = owner.gate_up_proj.shape[0]
            shapes = [(experts * rank, hidden), (hidden, experts * rank)]
        for factor, shape in zip("AB", shapes):
            weights[f"{key}.lora_{factor}.weight"] = torch.randn(*shape, generator=generator)
    return weights


L0, L1 = "model.layers.0", "model.layers.1"
# LoraConfig arguments -> modules it does not target (or the model lacks) whose weights are added to
# the saved adapter; "all-linear" is written into the saved config (PEFT saves the names it found).
TARGETING = {
    "names, layers_to_transform, exclude_modules": (
        dict(
            r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
            exclude_modules=[f"{L0}.self_attn.v_proj"], target_parameters=["experts.down_proj"],
        ),
        [f"{L0}.self_attn.k_proj", f"{L0}.self_attn.v_proj", f"{L1}.self_attn.q_proj", f"{L0}.mlp.experts.base_layer",
         "lm_head", "model.embed_tokens", "model.layers.7.self_attn.q_proj"],
    ),
    "regex": (
        dict(r=2, target_modules=r".*\.1\.self_attn\.(q|o)_proj", target_parameters=["experts.gate_up_proj"]),
        [f"{L1}.self_attn.k_proj", f"{L0}.self_attn.q_proj", f"{L1}.mlp.experts.base_layer", "lm_head"],
    ),
    "all-linear": (dict(r=2, target_modules="all-linear"), ["lm_head", f"{L0}.mlp.experts", "model.embed_tokens"]),
}  # fmt: skip


@pytest.mark.parametrize("targeting", list(TARGETING))
def test_untargeted_weights_are_ignored_as_peft_does(targeting, tmp_path):
    """Weights of modules the config does not target are ignored with a warning: the patched model
    gives ``PeftModel.from_pretrained``'s logits. On Qwen2-MoE, which PEFT 0.21 loads without its
    transformers-4-to-5 renaming (that rewrites a string ``target_modules`` into leaf names, losing a
    regex's layer and adding the experts to ``all-linear``)."""
    family = "qwen2_moe"
    config, modules = TARGETING[targeting]
    path, _ = make_peft_adapters(family, tmp_path, {"x": config})["x"]
    weights_file = f"{path}/adapter_model.safetensors"
    untargeted = _lora_weights(tiny_model(family), modules)
    save_file({**load_file(weights_file), **untargeted}, weights_file)
    if config["target_modules"] == "all-linear":
        _rewrite_config(tmp_path / "x", target_modules="all-linear")
    ids = batch_ids(2)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(tiny_model(family), path).eval()(ids).logits
        base = tiny_model(family)(ids).logits
        model = tiny_model(family)
        ignoring = rf"^adapter 'x' \({re.escape(path)}\): ignoring {len(untargeted)} weights of modules that its config"
        with pytest.warns(UserWarning, match=ignoring) as warned:
            handle = patch_model(model, {"x": path})
        with handle.adapters(["x", "x"]):
            out = model(ids).logits
    message = next(str(w.message) for w in warned if "ignoring" in str(w.message))
    print(message)
    shown = message.split("as PEFT ignores them: ")[1].split(" and ")[0].split(", ")
    assert set(shown) <= set(untargeted) and len(shown) == min(len(untargeted), 8), shown
    assert_rows_match(out, reference, ["x", "x"], f"{targeting}: patched vs PeftModel.from_pretrained")
    assert (reference - base).abs().max() > 0.05 * reference.abs().max()
