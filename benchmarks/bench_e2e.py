"""End-to-end throughput of full-size MoE models serving many LoRA adapters (GPU; ``--tiny`` runs anywhere).

Models with random bf16 weights are built on the device at the shapes of Qwen3-30B-A3B (48 layers,
128 experts of 768, top-8; ``sdpa``) and GPT-OSS-20B (24 layers, 32 experts of 2880, top-4, sliding
and full attention; eager, as transformers has no ``sdpa`` path for its sinks). Adapters of rank
``--rank`` on the experts (PEFT ``target_parameters``) and on q/k/v/o are random ``(state_dict,
config)`` pairs made on the device one at a time, keyed as PEFT saves them (``adapter_layout``).

Rows of ``--grid full``; ``--grid minimal`` (the default) runs the starred ones, in this order:
* part ``static``: static batches (``generate``; compiled: a static cache, with which transformers
  compiles the decode step) at each of ``--batches``: the unpatched model eager and compiled;
  patched (16 slots) with no mapping* and 1 and 16* adapters round-robin over the rows, compiled,
  and eager at ``--batch``; part ``slots32``: 32 slots with no mapping* and 32 adapters*, the same
  way. The patched rows of one batch and handle are timed interleaved, a generation of each in
  turn for ``--repeats`` rounds, and their ratio comes with its rounds' range;
* part ``serving``: continuous batching (transformers' own, CUDA graphs) of ``--requests`` requests
  of mixed prompt (16-256) and output (16-128) lengths on the patched model: with no adapter*, over
  16 adapters* and over 64 adapters through 16 slots* (requests wait for slots); the same requests
  as compiled static batches of ``--batch``*; the swap-in* of a registered host-only adapter;
* part ``rank64``: as many adapters of rank 64 as fit (up to 16), compiled, at ``--batch``.
GPT-OSS-20B runs the same; in the minimal grid only part ``static``.

Each row keeps the commit of the tree it measured (``--commit``, default git's HEAD), and a ratio
of rows from two trees names both. Each row is printed when measured, and ``<out>/<gpu>/e2e.json``
and ``e2e_table.txt`` (rows and the ratios the performance targets name) are rewritten after it.
``--parts`` with ``--merge`` splits a grid over several runs, each keeping the rows of the folder's
``e2e.json`` that it does not measure again; ``--static-adapters`` picks part static's patched
rows (``16`` alone: GPT-OSS-20B's missing row, ``--models gpt_oss_20b --parts static
--static-adapters 16 --merge``); ``--unpatched`` adds the unpatched rows at ``--batch``, eager
and compiled, to the minimal grid (the first-call ratio). ``--fp8-experts`` replaces the experts by
transformers' ``FP8Experts`` holding them in e4m3 with 128x128 float32 block scales (the FP8
checkpoints' layout; Qwen3 only, GPT-OSS's experts have biases) and runs the patched rows under
``<model>+fp8``; its target, the 16-adapter row at >= 1.4x the bf16 model's, takes the bf16 row
from the folder (``--models qwen3_30b_a3b --parts static --static-adapters 16 --fp8-experts
--merge``). ``plot.py`` draws ``e2e.png``.
``--tiny``: tiny models in float32, small sizes, compiled rows skipped without CUDA
(``tests/test_bench_e2e.py`` runs it and checks the adapters against PEFT).

    python benchmarks/bench_e2e.py --out benchmarks/results
    python benchmarks/bench_e2e.py --models qwen3_30b_a3b --parts serving --merge --out benchmarks/results
    python benchmarks/bench_e2e.py --tiny --grid full --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from common import results_dir
from full_size import MODELS, adapter_bytes, adapter_layout, build_model, quantize_experts, register
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig, ContinuousBatchingConfig

from torch_moe_lora import patch_model

SIZES = {
    False: dict(batch=64, batches=[1, 16, 64, 256], prompt=64, new_tokens=32, requests=256, repeats=5,
                request_prompt=(16, 256), request_new_tokens=(16, 128), page=64, batch_tokens=256),
    True: dict(batch=4, batches=[1, 4], prompt=8, new_tokens=4, requests=8, repeats=1,
               request_prompt=(4, 24), request_new_tokens=(2, 8), page=16, batch_tokens=64),
}  # fmt: skip
"""Default sizes, full-size and ``--tiny`` (``page``, ``batch_tokens``: the continuous-batching cache)."""
PARTS = ["static", "slots32", "serving", "rank64"]
CUDA = torch.cuda.is_available()
ROW_KEY = ("model", "layers", "setup", "batch", "requests", "adapters", "slots", "rank")
"""The fields that tell rows apart (a merged run replaces the rows it measures again)."""


class Request(NamedTuple):
    """One request of the continuous-batching workload."""

    prompt: list[int]
    new_tokens: int
    adapter: str | None


def with_adapters(requests: list[Request], count: int, seed: int) -> list[Request]:
    """``requests``, each on one of ``lora0..lora<count-1>`` drawn at random (fixed seed)."""
    rng = random.Random(seed + count)
    return [r._replace(adapter=f"lora{rng.randrange(count)}") for r in requests]


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds that ``fn()`` takes, the device synchronized before and after."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def release(model: nn.Module) -> None:
    """Drops what compiled generation left on ``model`` (compiled call, CUDA graphs, static cache
    length), so that the next compiled row compiles afresh, and frees cached device memory and the
    cached pinned host memory (the host copies of the adapters of an unpatched handle)."""
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cache"):
        model.__dict__.pop(attr, None)
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def serve_once(manager, handle, requests: list[Request], tag: str) -> tuple[float, int]:
    """Adds every request at once; returns the seconds until the last one finished and the tokens generated."""
    synchronize()
    start, pending, tokens = time.perf_counter(), set(), 0
    for i, request in enumerate(requests):
        request_id = f"{tag}_{i}"
        handle.add_request(manager, request.prompt, adapter=request.adapter, request_id=request_id,
                           max_new_tokens=request.new_tokens)  # fmt: skip
        pending.add(request_id)
    while pending:
        output = manager.get_result(timeout=1.0)
        if output is None:
            if not manager.is_running():
                raise RuntimeError(f"the continuous-batching manager stopped with {len(pending)} requests unfinished")
        elif output.request_id in pending and output.is_finished():
            if output.error is not None:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            pending.discard(output.request_id)
            tokens += len(output.generated_tokens)
    synchronize()
    return time.perf_counter() - start, tokens


RATIOS = [
    ("static batch, 16 adapters / no mapping", "tokens_per_s", dict(kind="static", patched=True, adapters=16, slots=16),
     dict(kind="static", patched=True, adapters=0, slots=16), ">=", 0.93),
    ("static batch, 32 adapters / no mapping", "tokens_per_s", dict(kind="static", patched=True, adapters=32, slots=32),
     dict(kind="static", patched=True, adapters=0, slots=32), ">=", 0.9),
    ("continuous batching, 16 adapters / no adapter", "tokens_per_s",
     dict(kind="continuous", patched=True, adapters=16), dict(kind="continuous", patched=True, adapters=0), ">=", 0.9),
    ("continuous batching, 16 adapters / static batches of the same requests", "tokens_per_s",
     dict(kind="continuous", patched=True, adapters=16), dict(kind="static_requests", adapters=16), ">", 1.0),
    ("first call, patched no mapping / unpatched", "first_call_s", dict(kind="static", patched=True, adapters=0),
     dict(kind="static", patched=False, adapters=0), "<=", 1.2),
]  # fmt: skip
"""The ratios the targets name: (what, row field, numerator row, denominator row, comparison, target).
Static rows are those at ``--batch``, compiled (eager where there is no CUDA), the others those of
``--requests`` requests; rows with adapters are those of ``--rank``. Rows measured interleaved (one ``interleave`` key) also give the ratio of
each round, whose range the table prints."""
FP8_RATIO = ("static batch, 16 adapters, FP8 experts / bf16 experts", ">=", 1.4)
"""The FP8 experts' end-to-end target: a ``<model>+fp8`` static row with 16 adapters (``--fp8-experts``)
over the same row of ``<model>`` with the same layers (another run's, in the same folder)."""
COLUMNS = [
    ("model", "model", -18, "s"), ("setup", "setup", -58, "s"), ("layers", "layers", 7, "d"), ("batch", "batch", 6, "d"),
    ("requests", "requests", 9, "d"), ("adapters", "adapters", 9, "d"), ("slots", "slots", 6, "d"),
    ("tokens/s", "tokens_per_s", 11, ".1f"),
    ("first s", "first_call_s", 9, ".2f"), ("peak GiB", "peak_gib", 9, ".1f"), ("swap ms", "swap_in_ms", 9, ".1f"),
]  # fmt: skip
"""Table columns: header, row field, width (negative: left-aligned), format."""


def table_line(row: dict | None) -> str:
    """A row as a table line; the header line for None."""
    cells = []
    for header, field, width, spec in COLUMNS:
        value = header if row is None else row.get(field)
        if row is not None and field == "swap_in_ms":
            value = None if row["swap_in_s"] is None else 1e3 * row["swap_in_s"]
        text = "-" if value is None else format(value, "s" if row is None else spec)
        cells.append(text.ljust(-width) if width < 0 else text.rjust(width))
    return "".join(cells)


class Bench:
    """One run: its sizes, its rows (each printed when measured, then ``e2e.json`` and
    ``e2e_table.txt`` rewritten), and the measurements."""

    def __init__(self, args, sizes: dict, folder: Path, header: dict):
        self.args, self.sizes, self.folder, self.header, self.rows = args, sizes, folder, header, []
        self.layers: dict[str, int] = {}  # each model's layers as built (rows and ratios keep them apart)
        self.started, self.interleaved = time.strftime("%Y%m%dT%H%M%S"), 0  # ``interleave`` keys of this run
        previous = folder / "e2e.json"
        if args.merge and previous.exists():
            kept = json.loads(previous.read_text())
            self.rows, header["runs"] = kept["rows"], kept.get("runs", []) + header["runs"]
        self.title = (
            f"{header['device']}: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"grid {args.grid}{', tiny models' if args.tiny else ''}, rank {args.rank}"
        )
        print(f"{self.title}\n{table_line(None)}", flush=True)

    def add(self, **row) -> None:
        """Records a row (replacing a kept one of the same key), prints it and rewrites the files."""
        defaults = dict(layers=self.layers.get(row["model"]), batch=None, requests=None, adapters=0, slots=None, rank=None, compiled=False,
                        tokens_per_s=None, round_tokens_per_s=None, first_call_s=None, swap_in_s=None,
                        interleave=None)  # fmt: skip
        row = {**defaults, **row, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
               "commit": self.header.get("commit")}  # fmt: skip
        self.rows = [r for r in self.rows if any(r.get(k) != row[k] for k in ROW_KEY)] + [row]
        print(table_line(row), flush=True)
        self.write()

    def ratios(self) -> tuple[list[dict], list[str]]:
        """The target ratios of every model with rows: as JSON entries, and as table lines."""
        entries, lines = [], ["ratios (targets):"]
        for model_name, layers in dict.fromkeys((r["model"], r.get("layers")) for r in self.rows):
            label = f"{model_name}/{layers}L"  # rows of other layer counts (``--layers``) are ratios apart
            targets = list(RATIOS)
            if model_name.endswith("+fp8"):  # against the bf16 model's row (a match's own model wins)
                what, comparison, target = FP8_RATIO
                top = dict(kind="static", patched=True, adapters=16)
                targets.append((what, "tokens_per_s", top, dict(top, model=model_name.removesuffix("+fp8")),
                                comparison, target))  # fmt: skip
            for what, field, top, bottom, comparison, target in targets:
                values = []
                for match in (top, bottom):
                    rank = dict(rank=self.args.rank) if match["adapters"] else {}
                    match = {"model": model_name, "layers": layers, **rank, **match}
                    if match["kind"] == "static":
                        match.update(batch=self.sizes["batch"], compiled=CUDA)
                    else:  # the workload of this run's --requests
                        match.update(requests=self.sizes["requests"])
                    found = [r for r in self.rows if all(r.get(key) == value for key, value in match.items())]
                    # The denominator measured interleaved with the numerator, where there is one.
                    key = values[0].get("interleave") if values and values[0] else None
                    found.sort(key=lambda r: key is None or r.get("interleave") != key)
                    values.append(found[0] if found else None)
                if None in values:
                    lines.append(f"  {label:<22}{what:<72}   n/a (rows not measured)")
                    continue
                ratio = values[0][field] / values[1][field]
                met = {">=": ratio >= target, ">": ratio > target, "<=": ratio <= target}[comparison]
                trees = list(dict.fromkeys(str(r.get("commit")) for r in values))  # "None": a tree not recorded
                entry = dict(model=model_name, layers=layers, what=what, ratio=ratio, target=f"{comparison} {target}", met=met,
                             trees=trees)  # fmt: skip
                note = "" if len(trees) == 1 else ", rows of trees " + " and ".join(trees)
                if values[0].get("interleave") is not None and values[0]["interleave"] == values[1].get("interleave"):
                    rounds = [a / b for a, b in zip(values[0]["round_tokens_per_s"], values[1]["round_tokens_per_s"])]
                    entry["round_ratios"] = rounds
                    note += f", interleaved: {len(rounds)} rounds {min(rounds):.3f}-{max(rounds):.3f}"
                entries.append(entry)
                lines.append(f"  {label:<22}{what:<72}{ratio:6.3f} (target {comparison} {target}: "
                             f"{'met' if met else 'missed'}){note}")  # fmt: skip
        return entries, lines

    def write(self) -> list[str]:
        """Rewrites ``e2e.json`` and ``e2e_table.txt``; returns the ratio lines."""
        entries, lines = self.ratios()
        result = {**self.header, "rows": self.rows, "ratios": entries}
        (self.folder / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
        table = [self.title, table_line(None), *map(table_line, self.rows), *lines]
        (self.folder / "e2e_table.txt").write_text("\n".join(table) + "\n")
        return lines

    @staticmethod
    def generate_kwargs(new_tokens: int, compiled: bool) -> dict:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if compiled:
            kwargs.update(cache_implementation="static", compile_config=CompileConfig(dynamic=False))
        return kwargs

    def static(self, model_name, model, handle, batch: int, counts, compiled: bool, rank: int | None = None):
        """Static-batch rows at ``batch``, one for each adapter count of ``counts`` (0: no mapping;
        ``handle`` None: the unpatched model, ``counts`` ``(0,)``), each count's adapters round-robin
        over the rows.

        Each count's first generation is timed alone (the compile of a compiled row), then
        ``repeats`` rounds time one generation of each count in turn: the rows of one call are
        measured interleaved in one process, so their ratio is not one of two stretches of a shared
        machine's time. Each row keeps its rounds' tokens/s (``round_tokens_per_s``), its median
        (``tokens_per_s``) and the call's ``interleave`` key.
        """
        setups, names = {}, {}
        for adapters in counts:
            what = "unpatched" if handle is None else f"{adapters} adapters r{rank}" if adapters else "no mapping"
            setups[adapters] = f"{'' if handle is None else 'patched, '}{what}, {'compiled' if compiled else 'eager'}"
            names[adapters] = [f"lora{i % adapters}" for i in range(batch)] if adapters else None
        if compiled and not CUDA:
            for setup in setups.values():
                print(f"{model_name:<18}{setup:<58}skipped: compiled rows need CUDA", flush=True)
            return
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        shape, generator = (batch, self.sizes["prompt"]), torch.Generator().manual_seed(batch)
        ids = torch.randint(1, model.config.vocab_size, shape, generator=generator).to(model.device)
        kwargs = dict(self.generate_kwargs(self.sizes["new_tokens"], compiled), attention_mask=torch.ones_like(ids))

        def generate(adapters: int) -> float:
            with contextlib.nullcontext() if handle is None else handle.adapters(names[adapters]):
                return timed(lambda: model.generate(ids, **kwargs))

        first = {adapters: generate(adapters) for adapters in counts}
        tokens = batch * self.sizes["new_tokens"]
        rounds = {adapters: [] for adapters in counts}
        for _ in range(self.sizes["repeats"]):
            for adapters in counts:
                rounds[adapters].append(tokens / generate(adapters))
        self.interleaved += 1
        for adapters in counts:
            self.add(model=model_name, setup=setups[adapters], kind="static", patched=handle is not None,
                     compiled=compiled, batch=batch, adapters=adapters, slots=handle.max_loras if handle else None,
                     rank=rank if adapters else None, tokens_per_s=statistics.median(rounds[adapters]),
                     round_tokens_per_s=rounds[adapters], first_call_s=first[adapters],
                     interleave=f"{self.header.get('commit')}/{self.started}/{self.interleaved}")  # fmt: skip

    def static_requests(self, model_name, model, handle, requests: list[Request], adapters: int, rank: int):
        """The workload's requests as static batches of ``--batch`` in arrival order, left-padded to the
        longest prompt, each generating the most new tokens any request asks for (one compiled shape);
        tokens/s counts the tokens the requests asked for."""
        batch = self.sizes["batch"]
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        longest = max(len(r.prompt) for r in requests)
        kwargs = self.generate_kwargs(max(r.new_tokens for r in requests), compiled=CUDA)

        def run(group):
            rows = group + [group[-1]._replace(adapter=None)] * (batch - len(group))  # pads the last batch
            ids = torch.tensor([[0] * (longest - len(r.prompt)) + r.prompt for r in rows], device=model.device)
            with handle.adapters([r.adapter for r in rows]):
                model.generate(ids, attention_mask=(ids != 0).long(), **kwargs)

        groups = [requests[i : i + batch] for i in range(0, len(requests), batch)]
        first = timed(lambda: run(groups[0]))
        seconds = sum(timed(lambda group=group: run(group)) for group in groups)
        setup = f"same requests as static batches, {adapters} adapters r{rank}, {'compiled' if CUDA else 'eager'}"
        self.add(model=model_name, setup=setup, kind="static_requests", patched=True, compiled=CUDA, batch=batch,
                 requests=len(requests), adapters=adapters, slots=handle.max_loras, rank=rank,
                 tokens_per_s=sum(r.new_tokens for r in requests) / seconds, first_call_s=first)  # fmt: skip

    def cb_config(self, requests: list[Request]) -> ContinuousBatchingConfig:
        """A paged cache that holds every request at once, CUDA graphs on (where there is CUDA)."""
        page, longest = self.sizes["page"], max(len(r.prompt) + r.new_tokens for r in requests)
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        return ContinuousBatchingConfig(**{
            "page_size" if "page_size" in fields else "block_size": page,
            "num_blocks": len(requests) * (math.ceil(longest / page) + 1),
            "max_batch_tokens": self.sizes["batch_tokens"], "use_cuda_graph": CUDA, "allow_block_sharing": False,
        })  # fmt: skip

    def serve(self, model_name, handle, requests: list[Request], adapters: int, rank: int | None = None):
        """A continuous-batching row: a warm-up pass of the workload (first call: CUDA graph captures),
        then the timed pass on the same manager."""
        what = f"{adapters} adapters r{rank}" if adapters else "no adapter"
        setup = f"continuous batching, {what}" + (
            f" via {handle.max_loras} slots" if adapters > handle.max_loras else ""
        )
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        most = max(r.new_tokens for r in requests)
        generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=most)
        manager = handle.init_continuous_batching(generation, self.cb_config(requests))
        manager.start()
        try:
            first, _ = serve_once(manager, handle, requests, "warmup")
            seconds, tokens = serve_once(manager, handle, requests, "timed")
        finally:
            manager.stop(block=True)
        self.add(model=model_name, setup=setup, kind="continuous", patched=True, requests=len(requests),
                 adapters=adapters, slots=handle.max_loras, rank=rank, tokens_per_s=tokens / seconds,
                 first_call_s=first)  # fmt: skip

    def swap_in(self, model_name, handle, layout: dict, rank: int, dtype: torch.dtype, samples: int = 5) -> None:
        """The median time of ``set_adapters([name])`` for registered adapters without a slot (their host
        copies written into the least recently used slot; the device synchronized around it)."""
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        host_only = [name for name in handle.registered_adapters if handle.slot_of(name) is None][:samples]
        seconds = statistics.median(timed(lambda name=name: handle.set_adapters([name])) for name in host_only)
        handle.set_adapters(None)
        setup = f"swap-in of one adapter r{rank} ({adapter_bytes(layout, dtype) / 2**30:.2f} GiB)"
        self.add(model=model_name, setup=setup, kind="swap", patched=True, adapters=len(handle.registered_adapters),
                 slots=handle.max_loras, rank=rank, swap_in_s=seconds)  # fmt: skip


def run_model(bench: Bench, model_name: str) -> None:
    """The rows of ``model_name`` that the grid and ``--parts`` ask for."""
    args, sizes, rank = bench.args, bench.sizes, bench.args.rank
    full = args.grid == "full"
    parts = [p for p in args.parts if full or p == "static" or (p != "rank64" and model_name == "qwen3_30b_a3b")]
    if not parts:
        return
    device, dtype = ("cuda" if CUDA else "cpu"), (torch.float32 if args.tiny else torch.bfloat16)
    start = time.perf_counter()
    model = build_model(model_name, args.layers, args.tiny, device, dtype)
    print(f"{model_name}: built {model.config.num_hidden_layers} layers in {time.perf_counter() - start:.1f} s")
    layouts = {rank: adapter_layout(model, rank)}  # of the model as built (PEFT's keys and shapes)
    layout = layouts[rank]
    row_name = model_name
    if args.fp8_experts:
        quantize_experts(model)
        release(model)
        row_name = f"{model_name}+fp8"
        print(f"{model_name}: experts quantized to FP8 in 128x128 blocks", flush=True)
    bench.layers[row_name] = model.config.num_hidden_layers
    rng = random.Random(args.seed)
    (p_lo, p_hi), (n_lo, n_hi) = sizes["request_prompt"], sizes["request_new_tokens"]
    vocab = model.config.vocab_size
    requests = [
        Request([rng.randrange(1, vocab) for _ in range(rng.randint(p_lo, p_hi))], rng.randint(n_lo, n_hi), None)
        for _ in range(sizes["requests"])
    ]
    batches = sizes["batches"] if full else [sizes["batch"]]
    handle = None

    def unpatch():
        nonlocal handle
        if handle is not None:
            handle.unpatch()
        handle = None
        release(model)

    def repatch(count: int, slots: int, adapter_rank: int = rank):
        unpatch()
        patched = patch_model(model, {}, max_loras=slots, max_rank=adapter_rank)
        if adapter_rank not in layouts:
            layouts[adapter_rank] = adapter_layout(model, adapter_rank)
        register(patched, layouts[adapter_rank], adapter_rank, range(count), device, dtype)
        return patched

    def static_rows(counts):
        for batch in batches:
            if full and batch == sizes["batch"]:
                bench.static(row_name, model, handle, batch, counts, compiled=False, rank=rank)
            bench.static(row_name, model, handle, batch, counts, compiled=True, rank=rank)

    # The unpatched FP8 model would run transformers' own FP8 kernels (the ``kernels`` package): not timed.
    unpatched = not args.fp8_experts
    if full and "static" in parts and unpatched:
        for batch in batches:
            bench.static(row_name, model, None, batch, (0,), compiled=False)
            bench.static(row_name, model, None, batch, (0,), compiled=True)
    elif args.unpatched and "static" in parts and unpatched:
        bench.static(row_name, model, None, sizes["batch"], (0,), compiled=False)
        bench.static(row_name, model, None, sizes["batch"], (0,), compiled=True)
    if "static" in parts:
        handle = repatch(16, 16)
        static_rows(args.static_adapters or ((0, 1, 16) if full else (0, 16)))
    if "slots32" in parts:
        handle = repatch(32, 32)
        static_rows((0, 32))  # no mapping on the same handle: the 32-adapter ratio's rows interleaved
    if "serving" in parts:
        handle = repatch(16, 16)
        spread16 = with_adapters(requests, 16, args.seed)
        bench.serve(row_name, handle, requests, 0)
        bench.serve(row_name, handle, spread16, 16, rank)
        bench.static_requests(row_name, model, handle, spread16, 16, rank)
        register(handle, layout, rank, range(16, 64), device, dtype)
        bench.serve(row_name, handle, with_adapters(requests, 64, args.seed), 64, rank)
        bench.swap_in(row_name, handle, layout, rank, dtype)
    if "rank64" in parts:
        unpatch()
        free = torch.cuda.mem_get_info()[0] - 24 * 2**30 if CUDA else math.inf  # 24 GiB: activations, graphs
        per_slot = adapter_bytes(adapter_layout(model, 64), dtype)
        slots = max([n for n in (16, 8, 4, 2, 1) if n * per_slot <= free] or [1])
        handle = repatch(slots, slots, 64)
        bench.static(row_name, model, handle, sizes["batch"], (slots,), compiled=CUDA, rank=64)
    unpatch()


def git_commit() -> str | None:
    """The short commit of this checkout's HEAD (uncommitted changes not told apart), or None where
    the tree is not a git checkout: pass ``--commit`` there."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=["minimal", "full"], default="minimal")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="parts of the grid to run (all)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of <out>/<gpu>/e2e.json not measured again")
    parser.add_argument("--static-adapters", type=int, nargs="+", choices=[0, 1, 16],
                        help="adapter counts of part static's patched rows (minimal: 0 16; full: 0 1 16)")  # fmt: skip
    parser.add_argument("--unpatched", action="store_true",
                        help="minimal grid: part static also times the unpatched model, eager and compiled")  # fmt: skip
    parser.add_argument("--layers", type=int, help="layers of each model (default: all)")
    parser.add_argument("--fp8-experts", action="store_true",
                        help="the experts as FP8Experts (e4m3, 128x128 float32 block scales), rows of <model>+fp8 "
                        "(patched rows only)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, help="batch of the minimal grid, the eager rows and the ratios (64)")
    parser.add_argument("--batches", type=int, nargs="+", help="static batches of the full grid (1 16 64 256)")
    parser.add_argument("--prompt", type=int, help="prompt tokens of the static batches (64)")
    parser.add_argument("--new-tokens", type=int, help="new tokens of the static batches (32)")
    parser.add_argument("--requests", type=int, help="requests of the continuous-batching workload (256)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of static generations after the first (5)")
    parser.add_argument("--commit", help="the commit of the tree measured, kept in each row (default: git's HEAD here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny models, float32, small sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    sizes = dict(SIZES[args.tiny])
    sizes.update({key: value for key in sizes if (value := getattr(args, key, None)) is not None})
    if args.grid == "full":
        sizes["batches"] = sorted({*sizes["batches"], sizes["batch"]})
    torch._dynamo.config.recompile_limit = 64  # each batch and mapping kind compiles once per handle
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    run = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key != "out"}
    header = dict(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                  commit=args.commit or git_commit())  # fmt: skip
    bench = Bench(args, sizes, results_dir(args.out, device_name), dict(header, sizes=sizes, runs=[run]))
    for model_name in args.models:
        run_model(bench, model_name)
        gc.collect()  # the model and its handle hold each other (hooks): free both before the next model
        if CUDA:
            torch.cuda.empty_cache()
    print("\n".join(bench.write()), flush=True)


if __name__ == "__main__":
    main()
