"""Tunes the fused experts launch configs for one GPU and writes ``torch_moe_lora/configs/<gpu>.json``.

For every model shape and token bucket it searches, one part at a time (block_m, then the gate_up
tiles, the down tiles and the LoRA shrink tiles), timing the whole op with LoRA (rank 16, tokens
spread over 4 adapters, CUDA-graph replay over rotated inputs), and keeps the fastest. For decode
buckets where there is at most one pair per expert on average it then decides whether skipping
the align op (``pair_blocks``: every pair a block of its own) wins at rank 16 and 64, and decode
buckets whether splitting the shrink's input features over programs (``shrink.k_per_program``,
``shrink_split``) wins with 16 adapters. Other buckets
decide whether the expert weight tiles are read through tensor descriptors (``tma``). Every bucket
also decides the shrink's sub-block rows and programs per sub-block (``shrink_layout``).
With ``--fp8`` the experts are float8 e4m3 in 128x128 blocks (the FP8 checkpoints' format), the
prefill tiles also try K tiles of 128 (an FP8 tile of 128 is the bytes of a 16-bit tile of 64), prefill
buckets also decide ``fp8_activations`` (FP8 tensor-core GEMMs), and the buckets go to the shape's
``W=fp8`` entry (``shape_key``), which FP8 calls take before the 16-bit one.
``--decisions-only`` redoes only these decisions (or those named by ``--decide``) for the given
buckets, keeping their tiles. Buckets merge into the shape's entry of an existing file, written in
the ``LaunchConfig`` format (keys at their defaults left out); the time of each bucket's best tiles
merges into ``benchmarks/results/<gpu>/tuned_config_timings.json``.

    python benchmarks/tune.py --shapes qwen3_30b_a3b --out torch_moe_lora/configs
    python benchmarks/tune.py --shapes qwen3_30b_a3b --fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from torch_moe_lora.configs import LaunchConfig, device_file_name, get_config, shape_key

from common import FP8_BLOCK, SHAPES, TOKENS, ExpertsRunner, results_dir

DECODE_TILES = dict(block_n=(32, 64), block_k=(128, 256), num_warps=(4,), num_stages=(3, 4, 5))
PREFILL_TILES = dict(block_n=(64, 128), block_k=(64,), num_warps=(4, 8), num_stages=(3, 4))
SHRINK_CHOICES = dict(block_k=(64, 128, 256), num_stages=(2, 3, 4))
FP8_PREFILL_BLOCK_K = (64, 128)
"""The prefill tiles' K choices for FP8 weights (``--fp8``)."""
DECISIONS = ("shrink_layout", "decode", "shrink_split", "tma", "fp8_activations")
"""The switches ``decide`` takes (``--decisions-only --decide``)."""
SHRINK_SPLITS = (256, 512, 1024)
"""``shrink.k_per_program`` values a decode bucket tries (``shrink_split``)."""
WIN_MARGIN = 0.02
"""A decode variant (pair blocks) or a shrink layout must win by this fraction: smaller wins are
within run-to-run noise."""
TIMINGS_FILE = "tuned_config_timings.json"


def block_m_choices(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 4:
        return (16,)
    if rows_per_expert <= 64:
        return (16, 32, 64)
    return (64, 128)


fp8_block: int | None = None
"""Set by ``--fp8``: every timer's experts are FP8 in blocks of this size (``ExpertsRunner``)."""


def weights() -> str | None:
    """The weight format of the buckets tuned (``shape_key``)."""
    return None if fp8_block is None else "fp8"


def make_timer(shape, num_tokens, rank=16, adapters=4):
    """A function from a ``LaunchConfig`` to its milliseconds per call (``ExpertsRunner.time``) with LoRA
    of rank ``rank``, tokens spread over ``adapters`` adapters (FP8 experts under ``--fp8``)."""
    return ExpertsRunner(shape, num_tokens, rank=rank, scenario=f"uniform{adapters}", fp8_block=fp8_block).time


def best_of(run, base: LaunchConfig, part, candidates, log):
    """The fastest of ``base`` with each of ``candidates`` set (in the tiles ``part``, or at the top
    level where ``part`` is None), and its time."""
    best_ms, best = float("inf"), base
    for values in candidates:
        if part is None:
            config = dataclasses.replace(base, **values)
        else:
            config = dataclasses.replace(base, **{part: dataclasses.replace(getattr(base, part), **values)})
        try:
            ms = run(config)
        except (OutOfResources, CompilationError) as error:
            log(f"    skip {part} {values}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            continue
        if ms < best_ms:
            best_ms, best = ms, config
    log(f"    {part or 'block_m'}: {best_ms:.4f} ms")
    return best, best_ms


def grid(choices: dict) -> list[dict]:
    keys = list(choices)
    return [dict(zip(keys, values)) for values in itertools.product(*(choices[k] for k in keys))]


def alternate(run, a: dict, b: dict) -> tuple[float, float]:
    """Best of two timings each of configs ``a`` and ``b``, run alternately (one pair is noisy)."""
    ms_a, ms_b = float("inf"), float("inf")
    for _ in range(2):
        ms_a, ms_b = min(ms_a, run(a)), min(ms_b, run(b))
    return ms_a, ms_b


def on_off_timings(shape, num_tokens, config, key, log, ranks):
    """For each of ``ranks`` in turn (a generator: callers may stop early), the times of ``config``
    with ``key`` off and on, run alternately, logged."""
    for rank in ranks:
        run = make_timer(shape, num_tokens, rank=rank)
        off, on = (dataclasses.replace(config, **{key: value}) for value in (False, True))
        off_ms, on_ms = alternate(run, off, on)
        del run
        log(f"    rank {rank}: {key} {on_ms:.4f} ms, without {off_ms:.4f} ms")
        yield off_ms, on_ms


def switch_wins(shape, num_tokens, config, key, log, ranks=(16, 64)) -> bool:
    """Whether ``config`` with ``key`` on beats it with ``key`` off by ``WIN_MARGIN`` at every rank
    (stops timing at the first rank where it does not)."""
    timings = on_off_timings(shape, num_tokens, config, key, log, ranks)
    return all(on_ms < off_ms * (1 - WIN_MARGIN) for off_ms, on_ms in timings)


def faster_in_total(shape, num_tokens, config, key, log, ranks=(16, 64)) -> bool:
    """Whether ``config`` with ``key`` on takes less time summed over ``ranks`` than with it off.

    For switches that change no result and add no work anywhere (``tma``), where a small win is
    worth taking and a tie costs nothing.
    """
    off_ms, on_ms = map(sum, zip(*on_off_timings(shape, num_tokens, config, key, log, ranks)))
    return on_ms < off_ms


def shrink_layout(shape, num_tokens, config: LaunchConfig, log) -> LaunchConfig:
    """``config`` with the shrink's sub-block rows (``sub_m``) and programs per sub-block
    (``shrink.slot_programs``) chosen: of the layouts that beat the default (16 rows, one program
    per slot a sub-block can hold) by ``WIN_MARGIN`` with 16 adapters at rank 64, where sub-blocks
    hold several slots, the fastest there that loses at most ``WIN_MARGIN`` with 4 adapters at
    rank 16."""
    base = dataclasses.replace(config, sub_m=16, shrink=dataclasses.replace(config.shrink, slot_programs=None))
    layouts = [dict(slot_programs=4), dict(slot_programs=1)]
    for sub_m in (32, 64):
        if base.block_m % sub_m == 0 and not base.pair_blocks:
            layouts += [dict(sub_m=sub_m), dict(sub_m=sub_m, slot_programs=1)]
    many = make_timer(shape, num_tokens, rank=64, adapters=16)
    few = make_timer(shape, num_tokens, rank=16, adapters=4)
    best, best_ms = base, None
    for layout in layouts:
        changed = dataclasses.replace(
            base,
            sub_m=layout.get("sub_m", base.sub_m),
            shrink=dataclasses.replace(base.shrink, slot_programs=layout.get("slot_programs")),
        )
        default_ms, changed_ms = alternate(many, base, changed)
        log(f"    16 adapters, rank 64: shrink {layout} {changed_ms:.4f} ms, default {default_ms:.4f} ms")
        if changed_ms >= default_ms * (1 - WIN_MARGIN) or (best_ms is not None and changed_ms >= best_ms):
            continue
        few_default_ms, few_changed_ms = alternate(few, base, changed)
        log(f"    4 adapters, rank 16: shrink {layout} {few_changed_ms:.4f} ms, default {few_default_ms:.4f} ms")
        if few_changed_ms <= few_default_ms * (1 + WIN_MARGIN):
            best, best_ms = changed, changed_ms
    return best


def shrink_split(shape, num_tokens, config: LaunchConfig, log) -> LaunchConfig:
    """``config`` with ``shrink.k_per_program`` chosen (decode buckets): of the splits of
    ``SHRINK_SPLITS`` that beat no split by ``WIN_MARGIN`` with 16 adapters at ranks 16 and 64, the
    fastest at rank 16; no split if none does."""
    base = dataclasses.replace(config, shrink=dataclasses.replace(config.shrink, k_per_program=None))
    best, best_ms = base, None
    for k_per_program in SHRINK_SPLITS:
        if k_per_program % base.shrink.block_k:
            continue
        changed = dataclasses.replace(base, shrink=dataclasses.replace(base.shrink, k_per_program=k_per_program))
        rank16_ms = None
        for rank in (16, 64):
            run = make_timer(shape, num_tokens, rank=rank, adapters=16)
            off_ms, on_ms = alternate(run, base, changed)
            del run
            log(f"    16 adapters, rank {rank}: shrink k_per_program {k_per_program} {on_ms:.4f} ms, "
                f"without {off_ms:.4f} ms")  # fmt: skip
            if on_ms >= off_ms * (1 - WIN_MARGIN):
                break
            rank16_ms = on_ms if rank == 16 else rank16_ms
        else:
            if best_ms is None or rank16_ms < best_ms:
                best, best_ms = changed, rank16_ms
    return best


def decode_decisions(shape, num_tokens, config: LaunchConfig, log) -> LaunchConfig:
    """``config`` with ``pair_blocks`` decided where there is at most one pair per expert (else off)."""
    hidden, inter, num_experts, top_k = shape
    config = dataclasses.replace(config, pair_blocks=False)
    if num_tokens * top_k <= num_experts:
        config = dataclasses.replace(config, pair_blocks=switch_wins(shape, num_tokens, config, "pair_blocks", log))
    return config


def decide(shape, num_tokens, config: LaunchConfig, log, which=DECISIONS) -> LaunchConfig:
    """``config`` with the decisions named in ``which`` taken: ``shrink_layout`` for every bucket,
    ``decode`` (``decode_decisions``) and ``shrink_split`` for decode buckets, ``tma`` (weight tiles
    through tensor descriptors, ``faster_in_total``) for the others, and with FP8 experts also
    ``fp8_activations`` for those (``switch_wins``: it changes the results, by the activations'
    quantization, so it must win by ``WIN_MARGIN`` at ranks 16 and 64)."""
    hidden, inter, num_experts, top_k = shape
    decode = num_tokens * top_k <= 4 * num_experts
    if "shrink_layout" in which:
        config = shrink_layout(shape, num_tokens, config, log)
    if decode and "decode" in which:
        config = decode_decisions(shape, num_tokens, config, log)
    if decode and "shrink_split" in which:
        config = shrink_split(shape, num_tokens, config, log)
    if not decode and "tma" in which:
        config = dataclasses.replace(config, tma=faster_in_total(shape, num_tokens, config, "tma", log))
    if not decode and fp8_block is not None and "fp8_activations" in which:
        config = dataclasses.replace(
            config, fp8_activations=switch_wins(shape, num_tokens, config, "fp8_activations", log)
        )
    return config


def tune_shape(shape, tokens, log, decisions_only=False, which=DECISIONS):
    """Tuned buckets of one shape, and the milliseconds of each bucket's best tiles (timed before the
    decisions). ``decisions_only`` keeps each bucket's tiles from the current config and only takes
    the decisions named in ``which`` again (see ``decide``); it times no tiles."""
    hidden, inter, num_experts, top_k = shape
    buckets, timings = {}, {}
    for num_tokens in tokens:
        if decisions_only:
            config = get_config(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, num_tokens, weights())
            log(f"  T={num_tokens}:")
            buckets[str(num_tokens)] = decide(shape, num_tokens, config, log, which)
            continue
        run = make_timer(shape, num_tokens)
        config = get_config(None, num_experts, hidden, inter, top_k, num_tokens)
        log(f"  T={num_tokens}: default {run(config):.4f} ms")
        config, _ = best_of(
            run, config, None, [dict(block_m=m) for m in block_m_choices(num_tokens, top_k, num_experts)], log
        )
        prefill = PREFILL_TILES if fp8_block is None else dict(PREFILL_TILES, block_k=FP8_PREFILL_BLOCK_K)
        tiles = grid(DECODE_TILES if num_tokens * top_k <= 4 * num_experts else prefill)
        config, _ = best_of(run, config, "gate_up", tiles, log)
        config, _ = best_of(run, config, "down", tiles, log)
        config, ms = best_of(run, config, "shrink", grid(SHRINK_CHOICES), log)
        timings[str(num_tokens)] = round(ms, 5)
        del run
        buckets[str(num_tokens)] = decide(shape, num_tokens, config, log)
        torch.cuda.empty_cache()
    return buckets, timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--out", type=Path, default=Path("torch_moe_lora/configs"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results", help="where timings go")
    parser.add_argument(
        "--decisions-only", action="store_true",
        help="keep the tiles, take only the decisions again (shrink layout; pair blocks and shrink split at "
        "decode; tma otherwise)",
    )
    parser.add_argument(
        "--decide", nargs="+", default=list(DECISIONS), choices=list(DECISIONS),
        help="with --decisions-only: which decisions to take again",
    )
    parser.add_argument("--fp8", action="store_true", help=f"FP8 experts ({FP8_BLOCK}x{FP8_BLOCK} blocks): the W=fp8 entries")
    args = parser.parse_args()
    global fp8_block
    fp8_block = FP8_BLOCK if args.fp8 else None
    device = torch.cuda.get_device_name()
    path = args.out / device_file_name(device)
    tuned = json.loads(path.read_text()) if path.exists() else {}
    timings_path = results_dir(args.results, device) / TIMINGS_FILE
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings.update(
        device=device,
        what="milliseconds per call of each tuned bucket's best tiles, timed by benchmarks/tune.py before its switch "
        "decisions (bf16 x; bf16 experts, FP8 ones under the keys with W=fp8; LoRA rank 16, tokens over 4 "
        "adapters, CUDA-graph replay over rotated inputs), by shape and token bucket",
    )
    for name in args.shapes:
        shape = SHAPES[name]
        print(f"{name} {tuple(shape)}", flush=True)
        hidden, inter, num_experts, top_k = shape
        key = shape_key(num_experts, hidden, inter, top_k, weights())
        if args.decisions_only and key not in tuned:
            # A shape without tuned tiles takes what a call would (default.json's tiles, chosen by
            # rows per expert; for FP8 weights the shape's 16-bit entry where there is one): seed
            # every token bucket with them, so that token counts between the buckets taken here
            # keep that choice.
            shape_args = (num_experts, hidden, inter, top_k)
            tuned[key] = {str(t): get_config(device, *shape_args, t, weights()).to_dict() for t in TOKENS}
        configs, ms = tune_shape(shape, args.tokens, lambda m: print(m, flush=True), args.decisions_only, args.decide)
        buckets = tuned.setdefault(key, {})
        buckets.update({bucket: config.to_dict() for bucket, config in configs.items()})
        tuned[key] = dict(sorted(buckets.items(), key=lambda b: int(b[0])))
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tuned, indent=1) + "\n")
        if ms:
            shape_ms = timings.setdefault("ms", {}).setdefault(key, {})
            shape_ms.update(ms)
            timings["ms"][key] = dict(sorted(shape_ms.items(), key=lambda b: int(b[0])))
            timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
