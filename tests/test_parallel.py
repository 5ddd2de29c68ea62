"""Tensor and expert parallelism: ranks of a process group against the single-process patched model.

On the CPU two gloo processes (``torch.multiprocessing`` spawn) each patch the same tiny model with
the same PEFT adapters, split over the group, and run a mixed-adapter batch eagerly and under
``torch.compile(fullgraph=True)``; every rank's logits and greedy tokens must equal the unsplit
patched model's. Each rank reads only its slices of the adapter files.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from utils import (
    ADAPTERS,
    GENERATE,
    ROWS,
    assert_close_verbose,
    batch_ids,
    fp8_models,
    legacy_adapter,
    make_peft_adapters,
    make_problem,
    save_adapter,
    tiny_model,
)

from torch_moe_lora import fused_experts, patch_model
from torch_moe_lora.adapters import BlockLoRA, StoredTensor, load_adapter_files, read_adapter
from torch_moe_lora.models import find_moe_blocks
from torch_moe_lora.parallel import ExpertSharding, fused_experts_expert_parallel
from torch_moe_lora.reference import gate_rows_ref

WORLD = 2
# Interface experts (plain, and GPT-OSS: transposed, interleaved, biases) and a whole block (Llama 4).
FAMILIES = ["qwen3_moe", "gpt_oss", "llama4"]


requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def run_batch(model, handle, device="cpu", compile_backend="aot_eager", generate=True):
    ids = batch_ids().to(device)
    with torch.no_grad(), handle.adapters(ROWS):
        logits = model(ids).logits
        tokens = model.generate(ids, **GENERATE) if generate else None
        compiled = torch.compile(model, backend=compile_backend, fullgraph=True)(ids).logits
    return logits.float().cpu(), None if tokens is None else tokens.cpu(), compiled.float().cpu()


def init_group(rank: int, backend: str, init_file: str) -> torch.device:
    """Joins the two-process group; the rank's device (its own GPU under NCCL)."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    return device


def gpu_compile_backend(family: str) -> str:
    """Inductor for one family on the GPUs (it compiles for minutes), aot_eager for the others."""
    return "inductor" if family == "qwen3_moe" else "aot_eager"


def worker(rank: int, family: str, adapters: dict, init_file: str, out_dir: str, backend: str = "gloo") -> None:
    """Patches the model split over the group in each mode and saves logits, tokens and compiled
    logits; under NCCL in bfloat16, without generation."""
    device = init_group(rank, backend, init_file)
    gpu = backend == "nccl"
    try:
        results = {}
        for mode in ("tensor", "expert"):
            model = tiny_model(family).to(device, torch.bfloat16 if gpu else torch.float32)
            handle = patch_model(model, adapters, process_group=dist.group.WORLD, parallelism=mode)
            torch._dynamo.reset()
            results[mode] = run_batch(model, handle, device, gpu_compile_backend(family) if gpu else "aot_eager", not gpu)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", FAMILIES)
def test_split_model_matches_unsplit(family, tmp_path):
    made = make_peft_adapters(family, tmp_path)
    adapters = {name: path for name, (path, _) in made.items()}
    model = tiny_model(family)
    torch._dynamo.reset()
    ref_logits, ref_tokens, _ = run_batch(model, patch_model(model, adapters))
    mp.spawn(worker, args=(family, adapters, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    scale = ref_logits.abs().max().item()
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode, (logits, tokens, compiled) in results.items():
            diff = (logits - ref_logits).abs().max().item()
            compiled_diff = (compiled - ref_logits).abs().max().item()
            print(f"{family} {mode} rank {rank}: max |diff| {diff:.2e}, compiled {compiled_diff:.2e} (scale {scale:.2e})")
            assert diff <= 1e-5 * scale, (family, mode, rank, diff)
            assert compiled_diff <= 1e-5 * scale, (family, mode, rank, compiled_diff)
            assert torch.equal(tokens, ref_tokens), (family, mode, rank)


@requires_two_gpus
@pytest.mark.parametrize("family", FAMILIES)
def test_split_model_matches_unsplit_on_two_gpus(family, tmp_path):
    """NCCL, bfloat16: each rank's logits (eager and compiled) are as close to the float32 unsplit
    model as the bfloat16 unsplit model on one GPU is (at most twice its error + 1e-3 x scale)."""
    made = make_peft_adapters(family, tmp_path)
    adapters = {name: path for name, (path, _) in made.items()}
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(family).to("cuda", dtype)
        refs[dtype] = run_batch(model, patch_model(model, adapters), "cuda", "aot_eager", generate=False)[0]
        del model
    ref32 = refs[torch.float32]
    scale = ref32.abs().max().item()
    own_err = (refs[torch.bfloat16] - ref32).abs().max().item()
    mp.spawn(worker, args=(family, adapters, str(tmp_path / "init"), str(tmp_path), "nccl"), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for mode, (logits, _, compiled) in torch.load(tmp_path / f"rank{rank}.pt").items():
            err = (logits - ref32).abs().max().item()
            compiled_err = (compiled - ref32).abs().max().item()
            print(
                f"{family} NCCL bf16 {mode} rank {rank}: max err vs fp32 unsplit {err:.3e}, compiled {compiled_err:.3e}; "
                f"unsplit bf16 {own_err:.3e} (scale {scale:.3e})"
            )
            assert err <= 2 * own_err + 1e-3 * scale, (family, mode, rank, err, own_err)
            assert compiled_err <= 2 * own_err + 1e-3 * scale, (family, mode, rank, compiled_err, own_err)


def local_experts(problem, rank: int):
    """Rank ``rank``'s experts of a problem (weights, biases, LoRA table), expert parallelism over WORLD."""
    share = problem.w13.shape[0] // WORLD
    span = slice(rank * share, (rank + 1) * share)
    cut = lambda t: None if t is None else t[span].contiguous()  # noqa: E731
    lora = problem.lora
    if lora is not None:
        lora = lora.experts(span.start, span.stop)
    return cut(problem.w13), cut(problem.w2), dict(
        problem.options, w13_bias=cut(problem.w13_bias), w2_bias=cut(problem.w2_bias), lora=lora
    )


def test_lora_weights_experts_cuts_every_matrix():
    lora = make_problem(T=2, H=8, I=4, E=6, K=2, L=3, R=2).lora
    part = lora.experts(2, 5)
    for whole, cut in zip(lora[:4], part[:4]):
        assert cut.shape[1] == 3 and cut.is_contiguous() and torch.equal(cut, whole[:, 2:5])
    assert part.gate_up_scale is lora.gate_up_scale and part.down_scale is lora.down_scale
    with pytest.raises(ValueError, match="not a range of the 6 experts"):
        lora.experts(4, 7)


def expert_parallel_worker(rank: int, problem, init_file: str, out_dir: str, backend: str = "gloo") -> None:
    """Each rank holds half the tokens and half the experts; saves its eager and compiled outputs."""
    device = init_group(rank, backend, init_file)
    try:
        problem = problem.to(device)
        tokens = problem.x.shape[0] // WORLD
        mine = slice(rank * tokens, (rank + 1) * tokens)
        w13, w2, kwargs = local_experts(problem, rank)
        args = (problem.x[mine], problem.topk_ids[mine], problem.topk_weights[mine], w13, w2)
        kwargs.update(group=dist.group.WORLD, token_lora=None if problem.token_lora is None else problem.token_lora[mine])
        out = fused_experts_expert_parallel(*args, **kwargs)
        compile_backend = "aot_eager" if backend == "gloo" else "inductor"
        compiled = torch.compile(fused_experts_expert_parallel, backend=compile_backend, fullgraph=True)
        outputs = [out, compiled(*args, **kwargs)]
        plain = [torch.empty_like(o, device="cpu").copy_(o) for o in outputs]
        torch.save(plain, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def check_expert_parallel(problem, tmp_path, backend: str) -> None:
    device = "cuda" if backend == "nccl" else "cpu"
    whole = problem.to(device)
    ref = fused_experts(whole.x, whole.topk_ids, whole.topk_weights, whole.w13, whole.w2, **whole.kwargs()).cpu()
    mp.spawn(expert_parallel_worker, args=(problem, str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD, join=True)
    tokens = problem.x.shape[0] // WORLD
    for rank in range(WORLD):
        out, compiled = torch.load(tmp_path / f"rank{rank}.pt")
        mine = ref[rank * tokens : (rank + 1) * tokens]
        assert_close_verbose(out, mine, problem.x.dtype, f"{backend} expert parallel rank {rank}")
        assert_close_verbose(compiled, mine, problem.x.dtype, f"{backend} expert parallel compiled rank {rank}")


@pytest.mark.parametrize(
    "case",
    [
        dict(T=12, H=16, I=8, E=4, K=2, L=3, R=4, bias=True, out_of_range_ids=True, seed=3),
        # 2-byte rows of an odd width (the packed gather pads them), int32 routing, no adapters.
        dict(T=6, H=15, I=8, E=4, K=3, L=0, R=4, dtype=torch.float16, seed=4),
    ],
    ids=["float32_lora", "float16_odd_hidden_no_lora"],
)
def test_expert_parallel_data_parallel_tokens(case, tmp_path):
    """Data-parallel tokens, experts split: each rank's outputs equal the unsplit op on its tokens."""
    problem = make_problem(**case)
    if case["L"] == 0:
        problem.topk_ids = problem.topk_ids.to(torch.int32)
    check_expert_parallel(problem, tmp_path, "gloo")


FP8_BLOCK = (8, 8)  # Qwen3's tiny I = 16: each of two ranks keeps one block of gate, of up and of down columns


def fp8_worker(rank: int, adapters: dict, init_file: str, out_dir: str) -> None:
    """The FP8 tiny Qwen3 split over the group in each mode: logits, eager and compiled."""
    init_group(rank, "gloo", init_file)
    try:
        results = {}
        for mode in ("tensor", "expert"):
            model, _ = fp8_models("qwen3_moe", FP8_BLOCK)
            handle = patch_model(model, adapters, process_group=dist.group.WORLD, parallelism=mode)
            torch._dynamo.reset()
            results[mode] = run_batch(model, handle, generate=False)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fp8_split_model_matches_unsplit(tmp_path):
    """FP8 experts (``FP8Experts``) split over two ranks keep their scale blocks: every rank's logits
    equal the unsplit FP8 model's, in tensor and in expert parallelism."""
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    made = make_peft_adapters("qwen3_moe", tmp_path)
    adapters = {name: path for name, (path, _) in made.items()}
    model, _ = fp8_models("qwen3_moe", FP8_BLOCK)
    torch._dynamo.reset()
    ref_logits, _, _ = run_batch(model, patch_model(model, adapters), generate=False)
    mp.spawn(fp8_worker, args=(adapters, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    scale = ref_logits.abs().max().item()
    for rank in range(WORLD):
        for mode, (logits, _, compiled) in torch.load(tmp_path / f"rank{rank}.pt").items():
            for what, got in (("eager", logits), ("compiled", compiled)):
                diff = (got - ref_logits).abs().max().item()
                assert diff <= 1e-5 * scale, (mode, rank, what, diff, scale)


def test_fp8_tensor_split_must_keep_whole_scale_blocks():
    model, _ = fp8_models("qwen3_moe", (16, 8))
    block = find_moe_blocks(model)[0]
    with pytest.raises(ValueError, match=r"\(16 / 2 = 8\) to be whole blocks of the weight scales \(16 gate/up rows, 8"):
        ExpertSharding("tensor", None, 0, 2).check(block)
    ExpertSharding("expert", None, 0, 2).check(block)  # experts split whole, scales and all


@requires_two_gpus
def test_expert_parallel_data_parallel_tokens_on_two_gpus(tmp_path):
    problem = make_problem(T=256, H=256, I=128, E=16, K=4, L=4, R=16, dtype=torch.bfloat16, seed=5)
    check_expert_parallel(problem, tmp_path, "nccl")


def test_uneven_split_is_refused():
    block = find_moe_blocks(tiny_model("qwen3_moe"))[0]
    experts, _, inter = block.spec.w2(block.experts).shape
    with pytest.raises(ValueError, match=f"intermediate size I \\({inter}\\) to be a multiple of 3"):
        ExpertSharding("tensor", None, 0, 3).check(block)
    with pytest.raises(ValueError, match=f"expert count E \\({experts}\\) to be a multiple of 3"):
        ExpertSharding("expert", None, 0, 3).check(block)


@pytest.mark.parametrize("family", FAMILIES)
def test_shards_hold_their_slices(family):
    """Rank 1 of 2 keeps the second half of the intermediate columns (TP) or of the experts (EP),
    in the module's own layout; the full shapes stay readable for adapters."""
    whole = find_moe_blocks(tiny_model(family))[0]
    w13, w2 = whole.spec.w13(whole.experts), whole.spec.w2(whole.experts)
    num_experts, _, inter = w2.shape
    half = inter // 2
    for mode in ("tensor", "expert"):
        block = find_moe_blocks(tiny_model(family))[0]
        ExpertSharding(mode, None, 1, 2).shard_block(block)
        got13, got2 = block.spec.w13(block.experts), block.spec.w2(block.experts)
        if mode == "expert":
            assert torch.equal(got13, w13[num_experts // 2 :]) and torch.equal(got2, w2[num_experts // 2 :])
            continue
        cols = torch.arange(half, inter)
        if block.spec.interleaved:
            rows = torch.stack([2 * cols, 2 * cols + 1], 1).flatten()
        else:
            rows = torch.cat([cols, inter + cols])
        assert torch.equal(got13, w13[:, rows]) and torch.equal(got2, w2[:, :, half:])
        if block.spec.w2_bias_name is not None:
            assert not block.spec.w2_bias(block.experts).any(), "only rank 0 adds the down bias"
        full = block.experts._moe_lora_full_parameters[block.spec.w13_name]
        assert full.device.type == "meta" and full.shape == getattr(whole.experts, block.spec.w13_name).shape


def plain_shard(lora: BlockLoRA, block, sharding: ExpertSharding) -> BlockLoRA:
    """This rank's slices of a whole-model expert LoRA, cut from the op-layout tensors."""

    def span(size: int) -> slice:
        share = size // sharding.world
        return slice(sharding.rank * share, (sharding.rank + 1) * share)

    def cut(pair, role):
        if pair is None:
            return None
        a, b = pair
        if sharding.mode == "expert":
            return a[span(a.shape[0])], b[span(b.shape[0])]
        if role == "down":
            return a[:, :, span(a.shape[2])], b
        if role == "gate_up":
            return a, b[:, sharding._gate_up_rows(block, b.shape[1])]
        return a, b[:, span(b.shape[1])]

    return lora._replace(**{role: cut(getattr(lora, role), role) for role in ("gate_up", "gate", "up", "down")})


def assert_same_lora(got: BlockLoRA, want: BlockLoRA, what: str) -> None:
    for role in ("gate_up", "gate", "up", "down"):
        g, w = getattr(got, role), getattr(want, role)
        assert (g is None) == (w is None), (what, role)
        if g is not None:
            assert torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]), (what, role)
    assert (got.gate_up_scale, got.down_scale) == (want.gate_up_scale, want.down_scale), what


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_read_takes_only_its_slices(family, tmp_path, monkeypatch):
    """Each rank's read of a PEFT directory equals the whole read cut to its shard, and reads from
    the file exactly the expert-LoRA elements it keeps."""
    path, _ = make_peft_adapters(family, tmp_path, {"a": ADAPTERS["a"]})["a"]
    model = tiny_model(family)
    blocks = find_moe_blocks(model)
    whole = read_adapter("a", path, model, blocks)
    whole_elements = sum(t.numel() for lora in whole.experts.values() for pair in lora[:4] if pair for t in pair)
    read_elements = {}
    stored_getitem = StoredTensor.__getitem__

    def counting_getitem(self, index):
        out = stored_getitem(self, index)
        read_elements[self.key] = read_elements.get(self.key, 0) + out.numel()
        return out

    monkeypatch.setattr(StoredTensor, "__getitem__", counting_getitem)
    for mode in ("tensor", "expert"):
        for rank in range(WORLD):
            sharding = ExpertSharding(mode, None, rank, WORLD)
            read_elements.clear()
            shard = read_adapter("a", path, model, blocks, sharding)
            kept = 0
            for block in blocks:
                assert_same_lora(shard.experts[block.name], plain_shard(whole.experts[block.name], block, sharding), mode)
                kept += sum(t.numel() for pair in shard.experts[block.name][:4] if pair is not None for t in pair)
            expert_reads = sum(n for key, n in read_elements.items() if ".experts." in key)
            assert expert_reads == kept, (mode, rank, expert_reads, kept)
            assert kept < whole_elements, (mode, rank, kept, whole_elements)
            in_memory = read_adapter("a", load_adapter_files(path), model, blocks, sharding)
            for block in blocks:
                assert_same_lora(in_memory.experts[block.name], shard.experts[block.name], f"{mode} in memory")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_sharded_read_of_per_expert_adapters(family, tmp_path):
    """4.x per-expert adapters: the shard equals the whole read cut, also once joined into a gate_up
    LoRA against a sharded block (what ``load_adapter`` does when the tables have no split slots)."""
    state_dict, config = legacy_adapter(family, patterns=True)
    path = save_adapter(tmp_path / "legacy", state_dict, config)
    model = tiny_model(family)
    blocks = find_moe_blocks(model)
    whole = read_adapter("legacy", path, model, blocks)
    for mode in ("tensor", "expert"):
        for rank in range(WORLD):
            sharding = ExpertSharding(mode, None, rank, WORLD)
            shard = read_adapter("legacy", path, model, blocks, sharding)
            sharded_model = tiny_model(family)
            for block, sharded_block in zip(blocks, find_moe_blocks(sharded_model)):
                whole_lora = whole.experts[block.name]
                assert_same_lora(shard.experts[block.name], plain_shard(whole_lora, block, sharding), mode)
                sharding.shard_block(sharded_block)
                rows = sharded_block.spec.w13(sharded_block.experts).shape[1]
                joined = shard.experts[block.name].joined(gate_rows_ref(rows, gated=True, interleaved=False))
                whole_rows = block.spec.w13(block.experts).shape[1]
                want = plain_shard(whole_lora.joined(gate_rows_ref(whole_rows, gated=True, interleaved=False)), block, sharding)
                assert_same_lora(joined, want, f"{mode} joined")
