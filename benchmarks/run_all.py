"""Run every benchmark, quick mode by default (`make bench`); `--full` runs the full versions.

Each script writes its own tables to benchmarks/results/. They are run one after another,
never in parallel: on a 2-core machine, concurrent jobs would distort every ratio.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_search", "bench_scoring_memory", "bench_parents_dtype", "bench_plan_copy", "bench_recipe_stats", "bench_heap_release", "bench_fitness", "bench_merge", "bench_merge_table", "bench_depth", "bench_width", "bench_ttm", "bench_ttm_scratch", "bench_joint", "bench_staged", "bench_recipe", "bench_structure"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="full benchmarks (hours on 2 cores)")
    parser.add_argument("names", nargs="*", help=f"a subset of: {', '.join(SCRIPTS)}")
    args = parser.parse_args()
    failed = []
    for name in args.names or SCRIPTS:
        command = [sys.executable, "-m", f"benchmarks.{name}"] + ([] if args.full else ["--quick"])
        print(f"== {' '.join(command[2:])}", flush=True)
        if subprocess.run(command, cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
