"""Prints, for every shape and token count of fused experts benchmark JSON files, how many cells miss
each performance target and by how much (the targets: ``performance_targets.py``).

    python benchmarks/targets.py benchmarks/results/<gpu>/fused_experts.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from performance_targets import summarize


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by bench_fused_experts.py")
    args = parser.parse_args()
    rows = [row for path in args.results for row in json.loads(path.read_text())["rows"]]
    print(summarize(rows))


if __name__ == "__main__":
    main()
