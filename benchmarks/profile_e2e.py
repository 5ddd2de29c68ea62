"""Where one decode step of a full-size patched model spends its time, by which layers see the mapping (GPU; ``--tiny`` runs anywhere).

One decode step (``--batch`` rows, one new token each, a static cache filled by a ``--prompt``-token
prefill) of a model from ``full_size.py`` patched with ``--adapters`` adapters of ``--rank`` in as
many slots, in four variants:

* ``none``: no mapping (every patched layer skips LoRA);
* ``both``: the adapters round-robin over the rows, seen by the experts and by q/k/v/o;
* ``experts``: the same mapping, seen by the experts only (the linears see none);
* ``linears``: the same mapping, seen by the linears only.

Each variant runs eager and compiled the way transformers compiles a static-cache decode step
(``mode="reduce-overhead"``: CUDA graphs; CUDA only). A row gives the milliseconds a step (median of
``--steps``, the device synchronized), the host milliseconds to issue one step on an idle device,
dynamo's graphs and graph breaks and inductor's CUDA-graph skips for the compiled step, the kernel
time of a profiled step against its wall time (kernels that add up to much less than the wall time:
the step waits on the host), and the step's largest kernels. The eager row also times the prefill
(``prefill ms``: the whole prompt through the model, eager, as ``generate`` runs it; ``busy``: its
kernel time, with its largest kernels) and lists the Python functions that take the most host time
in one eager step (``--host-top``; cProfile). ``delta`` is the largest logit change against ``none``
on the same input (zero would mean the variant computes no LoRA). Results:
``<out>/<gpu>/profile_e2e.json`` and ``profile_e2e.txt``.

    python benchmarks/profile_e2e.py --model qwen3_30b_a3b --layers 8 --out benchmarks/results
    python benchmarks/profile_e2e.py --tiny --out /tmp/profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import results_dir
from full_size import MODELS, adapter_layout, build_model, register
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from torch_moe_lora import patch_model
from torch_moe_lora.linear import MultiLoRALinear, SlotMapping
from torch_moe_lora.patching import STATE_ATTR

CUDA = torch.cuda.is_available()
VARIANTS = {"none": (False, False), "both": (True, True), "experts": (False, True), "linears": (True, False)}
"""Variant: (the linears see the mapping, the experts see it)."""
TOP_KERNELS = 12


def readers(model: torch.nn.Module, mapping: SlotMapping) -> tuple[list, list]:
    """The patched linears and the patched experts objects of ``model`` that read ``mapping``."""
    linears = [m for m in model.modules() if isinstance(m, MultiLoRALinear) and m.row_slots is mapping]
    experts = [s for m in model.modules() if getattr(getattr(m, STATE_ATTR, None), "mapping", None) is mapping
               for s in (getattr(m, STATE_ATTR),)]  # fmt: skip
    if not linears or not experts:
        raise RuntimeError(f"found {len(linears)} patched linears and {len(experts)} patched experts; need both")
    return linears, experts


@contextlib.contextmanager
def seen_by(model, mapping: SlotMapping, linears: bool, experts: bool):
    """Within the block, the linears (experts) that do not see the mapping read an empty one."""
    patched_linears, patched_experts = readers(model, mapping)
    empty = SlotMapping(mapping.num_slots)
    for module in [] if linears else patched_linears:
        module.row_slots = empty
    for state in [] if experts else patched_experts:
        state.mapping = empty
    try:
        yield
    finally:
        for module in patched_linears:
            module.row_slots = mapping
        for state in patched_experts:
            state.mapping = mapping


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def step_ms(step, steps: int) -> float:
    """The median milliseconds of one ``step()``, the device synchronized around each."""
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def issue_ms(step) -> float:
    """The host milliseconds to issue one ``step()`` on an idle device (no synchronization after it)."""
    synchronize()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    synchronize()
    return 1e3 * seconds


def kernel_profile(step, steps: int) -> dict:
    """Kernel (CUDA) or operator (CPU) time per step of ``steps`` profiled steps, the wall time per step
    and the largest entries."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        wall = time.perf_counter() - start
    if CUDA:
        entries = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0
                   and e.device_type == torch.autograd.DeviceType.CUDA]  # fmt: skip
    else:
        entries = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    entries.sort(key=lambda entry: -entry[2])
    return dict(
        wall_ms=1e3 * wall / steps,
        busy_ms=sum(us for _, _, us in entries) / steps / 1e3 if CUDA else None,
        top=[dict(name=name[:90], calls=count / steps, us=us / steps) for name, count, us in entries[:TOP_KERNELS]],
    )


def host_profile(step, top: int) -> list[dict]:
    """The ``top`` Python functions by own host time in one ``step()`` (cProfile; the device synchronized after)."""
    profiler = cProfile.Profile()
    synchronize()
    profiler.enable()
    step()
    synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [(f"{Path(file).name}:{line}({name})", calls, own, total)
            for (file, line, name), (_, calls, own, total, _) in stats.items()]  # fmt: skip
    rows.sort(key=lambda row: -row[2])
    return [dict(name=name, calls=calls, own_ms=1e3 * own, total_ms=1e3 * total)
            for name, calls, own, total in rows[:top]]  # fmt: skip


def dynamo_counts() -> dict:
    counters = torch._dynamo.utils.counters
    return dict(
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        cudagraph_skips=counters["inductor"]["cudagraph_skips"],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="qwen3_30b_a3b")
    parser.add_argument("--layers", type=int, help="layers of the model (default: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and mode")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--host-top", type=int, default=15, help="host functions listed for each eager step")
    parser.add_argument("--tiny", action="store_true", help="a tiny model in float32, small sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.prompt, args.steps = min(args.batch, 4), min(args.prompt, 8), min(args.steps, 3)
    device, dtype = ("cuda" if CUDA else "cpu"), (torch.float32 if args.tiny else torch.bfloat16)
    torch._dynamo.config.recompile_limit = 64

    model = build_model(args.model, args.layers, args.tiny, device, dtype)
    handle = patch_model(model, {}, max_loras=args.adapters, max_rank=args.rank)
    register(handle, adapter_layout(model, args.rank), args.rank, range(args.adapters), device, dtype)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=generator).to(device)
    # Every step writes the next position of the cache: room for all of them after the prompt.
    steps_per_mode = args.steps + 8
    cache = StaticCache(config=model.config, max_cache_len=args.prompt + 2 * steps_per_mode * len(args.variants))
    # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` goes in 5.40).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=prompt, **{cache_arg: cache})
    token = prompt[:, -1:].clone()

    def decode(forward, compiled: bool):
        def step():
            if compiled:  # each step may overwrite the last one's outputs (CUDA graphs)
                torch.compiler.cudagraph_mark_step_begin()
            return forward(input_ids=token, **{cache_arg: cache}).logits

        return step

    gpu = torch.cuda.get_device_name() if CUDA else "cpu"
    title = (f"{gpu}: torch {torch.__version__}, transformers {transformers.__version__}, {args.model} "
             f"{model.config.num_hidden_layers} layers, batch {args.batch}, {args.adapters} adapters r{args.rank}")  # fmt: skip
    print(title, flush=True)
    rows, reference = [], None
    names = [f"lora{i % args.adapters}" for i in range(args.batch)]
    with torch.no_grad():
        for variant in args.variants:
            linears, experts = VARIANTS[variant]
            handle.set_adapters(None if variant == "none" else names)
            with seen_by(model, handle.mapping, linears, experts):
                modes = [("eager", model.forward)] if "eager" in args.modes else []
                if CUDA and "compiled" in args.modes:
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()
                    modes.append(("compiled", torch.compile(model.forward, mode="reduce-overhead", dynamic=False)))
                for mode, forward in modes:
                    step = decode(forward, mode == "compiled")
                    start = time.perf_counter()
                    step()
                    synchronize()
                    first_s = time.perf_counter() - start
                    for _ in range(2):
                        step()
                    delta = prefill = None
                    if mode == "eager":  # the logits of the prompt's first tokens, without the cache
                        logits = model(input_ids=prompt[:, :8]).logits.float()
                        reference = logits if variant == "none" else reference
                        delta = None if reference is None else (logits - reference).abs().max().item()

                        def prefill_step():
                            return model(input_ids=prompt, use_cache=False)

                        prefill = step_ms(prefill_step, 3)
                        prefill_kernels = kernel_profile(prefill_step, 1)
                    row = dict(variant=variant, mode=mode, first_s=first_s, step_ms=step_ms(step, args.steps),
                               issue_ms=issue_ms(step), prefill_ms=prefill, delta=delta,
                               **kernel_profile(step, 3))  # fmt: skip
                    if mode == "compiled":
                        row.update(dynamo_counts())
                    else:
                        row["host"] = host_profile(step, args.host_top)
                        row.update(prefill_busy_ms=prefill_kernels["busy_ms"], prefill_top=prefill_kernels["top"])
                    rows.append(row)
                    print(f"{variant:<8} {mode:<8} step {row['step_ms']:8.3f} ms  issue {row['issue_ms']:8.3f} ms  "
                          f"first {first_s:6.1f} s  delta {delta if delta is None else f'{delta:.3g}'}", flush=True)  # fmt: skip
    folder = results_dir(args.out, gpu)
    result = dict(title=title, device=gpu, torch=torch.__version__, transformers=transformers.__version__,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, rows=rows)  # fmt: skip
    (folder / "profile_e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [title, f"{'variant':<8} {'mode':<8} {'step ms':>9} {'issue ms':>9} {'busy ms':>9} {'prefill ms':>10} "
             f"{'busy':>9} {'graphs':>6} {'breaks':>6} {'skips':>6} {'delta':>9}"]  # fmt: skip
    for r in rows:
        busy = "-" if r["busy_ms"] is None else f"{r['busy_ms']:.3f}"
        prefill = "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.3f}"
        prefill_busy = "-" if r.get("prefill_busy_ms") is None else f"{r['prefill_busy_ms']:.3f}"
        counts = [str(r.get(k, "-")) for k in ("graphs", "graph_breaks", "cudagraph_skips")]
        delta = "-" if r["delta"] is None else f"{r['delta']:.3g}"
        lines.append(f"{r['variant']:<8} {r['mode']:<8} {r['step_ms']:9.3f} {r['issue_ms']:9.3f} {busy:>9} "
                     f"{prefill:>10} {prefill_busy:>9} {counts[0]:>6} {counts[1]:>6} {counts[2]:>6} "
                     f"{delta:>9}")  # fmt: skip
    for r in rows:
        lines.append(
            f"\n{r['variant']} {r['mode']}: largest {'kernels' if CUDA else 'operators'} (us a step, calls a step)"
        )
        lines += [f"  {t['us']:10.1f} {t['calls']:6.1f}  {t['name']}" for t in r["top"]]
        if r.get("prefill_top"):
            lines.append(f"{r['variant']} {r['mode']}: largest kernels of the prefill (us, calls)")
            lines += [f"  {t['us']:10.1f} {t['calls']:6.1f}  {t['name']}" for t in r["prefill_top"]]
        if "host" in r:
            lines.append(f"{r['variant']} {r['mode']}: host time of one step by function (own ms, total ms, calls)")
            lines += [f"  {h['own_ms']:8.3f} {h['total_ms']:8.3f} {h['calls']:6d}  {h['name']}" for h in r["host"]]
    (folder / "profile_e2e.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
