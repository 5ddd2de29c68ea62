"""Per-token LoRA on linear layers (``moe_lora::add_lora_linear``), side by side (GPU only).

For the attention projections of Qwen3-30B-A3B (q: 2048 -> 4096, o: 4096 -> 2048) and batch rows of
one token (decode) or 256 tokens (prefill), every row on its own slot of ``L`` (cycling), times in
one CUDA graph per row of the table:

* ``base``: ``F.linear`` alone;
* ``ours``: ``F.linear`` + ``add_lora_linear`` (each token reads only its own adapter);
* ``all_slots``: ``F.linear`` + every slot's A and B applied to every token and masked to the
  token's slot, the formulation ``MultiLoRALinear`` used before (one shrink, a mask, one expand);
  it lets one adapter's NaN reach every row, and is here as the baseline of what it cost.

The LoRA roofline counts the bytes one adapter per distinct slot must read (its A and B) plus x
read and out read and written once more, over the measured read bandwidth; the table prints it
with the LoRA time (``ours - base``). Writes ``<out>/<gpu>/lora_linear.json``; ``plot.py`` draws it.

    python benchmarks/bench_lora_linear.py [--slots 16] [--rank 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_moe_lora import add_lora_linear, slot_segments

from common import measure_ceilings, results_dir, time_graph

PROJECTIONS = {"q_proj": (2048, 4096), "o_proj": (4096, 2048)}
BATCHES = [(1, 1), (16, 1), (64, 1), (256, 1), (4, 256), (16, 256)]  # (rows, tokens per row)


def all_slots(x, weight, a, b_columns, scale, slot_of_column, token_slot):
    out = F.linear(x, weight)
    shrunk = F.linear(x, a.view(-1, x.shape[1]))
    column_scale = torch.where(slot_of_column == token_slot[:, None], scale[slot_of_column], 0.0)
    return out + F.linear((shrunk * column_scale).to(x.dtype), b_columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=4, help="input sets rotated inside the graph")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    gpu = torch.cuda.get_device_name()
    dtype, L, R = torch.bfloat16, args.slots, args.rank
    rows_out = []
    print(f"{gpu}: read {ceilings.read_bytes_per_s / 1e12:.2f} TB/s, {L} slots of rank {R}, bf16")
    print(f"{'proj':7} {'rows':>5} {'tok/row':>7} {'base ms':>9} {'ours ms':>9} {'all_slots ms':>12} "
          f"{'lora ms':>8} {'lora roofline ms':>16} {'ours/all_slots':>14}")  # fmt: skip
    for proj, (n_in, n_out) in PROJECTIONS.items():
        weight = torch.randn(n_out, n_in, dtype=dtype, device="cuda") * n_in**-0.5
        a = torch.randn(L, R, n_in, dtype=dtype, device="cuda") * n_in**-0.5
        b = torch.randn(L, n_out, R, dtype=dtype, device="cuda") * R**-0.5
        b_columns = b.permute(1, 0, 2).reshape(n_out, L * R).contiguous()
        scale = torch.full((L,), 0.5, device="cuda")
        slot_of_column = torch.arange(L, device="cuda").repeat_interleave(R)
        for rows, per_row in BATCHES:
            tokens = rows * per_row
            row_slot = torch.arange(rows, device="cuda") % L
            segments = slot_segments(row_slot, L)
            token_slot = row_slot.repeat_interleave(per_row)
            xs = [torch.randn(tokens, n_in, dtype=dtype, device="cuda") for _ in range(args.inputs)]

            def ours(x):
                out = F.linear(x, weight)
                add_lora_linear(out, x, *segments, a, b, scale)
                return out

            base_ms = time_graph([lambda x=x: F.linear(x, weight) for x in xs])
            ours_ms = time_graph([lambda x=x: ours(x) for x in xs])
            dense_ms = time_graph(
                [lambda x=x: all_slots(x, weight, a, b_columns, scale, slot_of_column, token_slot) for x in xs]
            )
            used = min(rows, L)
            lora_bytes = 2 * (used * R * (n_in + n_out) + tokens * (n_in + 2 * n_out))
            roofline_ms = lora_bytes / ceilings.read_bytes_per_s * 1e3
            row = dict(
                projection=proj, rows=rows, tokens_per_row=per_row, slots=L, rank=R, base_ms=base_ms,
                ours_ms=ours_ms, all_slots_ms=dense_ms, lora_roofline_ms=roofline_ms,
            )  # fmt: skip
            rows_out.append(row)
            print(f"{proj:7} {rows:5d} {per_row:7d} {base_ms:9.4f} {ours_ms:9.4f} {dense_ms:12.4f} "
                  f"{ours_ms - base_ms:8.4f} {roofline_ms:16.4f} {ours_ms / dense_ms:14.2f}")  # fmt: skip
    result = dict(device=gpu, read_bytes_per_s=ceilings.read_bytes_per_s, dtype="bfloat16", rows=rows_out)
    (results_dir(args.out, gpu) / "lora_linear.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
