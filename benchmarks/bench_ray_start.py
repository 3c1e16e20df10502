"""What a run pays to start its own local Ray, against joining a running cluster.

Every `evofuse search` without an address starts a local Ray: GCS, raylet, the dashboard's
process (it runs even with the dashboard off), the dashboard and runtime-env agents, the
monitors. A run that joins a running cluster (`--address`, `workers.address`, RAY_ADDRESS)
pays only for its driver's connection. The test suite's real runs join one cluster for the
session (tests/conftest.py); this measures why.

Each driver is a fresh process doing what a run's start and end do: `init_ray` (evofuse's, its
watchdog included for a local Ray), one actor of one CPU answering once, `ray.shutdown()`.
The two ways alternate; per way the median seconds of each phase and the machine's busy CPU
seconds (/proc/stat, every process: Ray's helpers are not the driver's children to count)
from the driver's start until a settle pause after it ends, less the machine's idle rate over
the same span measured with the cluster up and nothing running.

    python -m benchmarks.bench_ray_start              # 5 drivers per way, ~3 min
    python -m benchmarks.bench_ray_start --repeats 2  # ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.bench_search import RESULTS, _machine
from benchmarks.ray_head import RayHead

SETTLE_S = 3.0  # after a driver ends: a local Ray's watchdog kills what is left within ~1 s

DRIVER = r"""
import json, os, sys, time
t0 = time.time()
import ray
from search.run.workers import init_ray
t1 = time.time()
init_ray(sys.argv[1] or None)
t2 = time.time()

@ray.remote(num_cpus=1)
class Ping:
    def pid(self):
        return os.getpid()

ray.get(Ping.remote().pid.remote())
t3 = time.time()
ray.shutdown()
t4 = time.time()
print(json.dumps({"import_s": t1 - t0, "init_s": t2 - t1, "first_actor_s": t3 - t2, "shutdown_s": t4 - t3}))
"""


def busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot: user, nice, system, irq, softirq, steal."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def one_driver(address: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    cpu0, wall0 = busy_cpu_seconds(), time.time()
    done = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"a driver failed: {done.stderr[-2000:]}")
    wall = time.time() - wall0
    time.sleep(SETTLE_S)
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    return {**phases, "driver_s": wall, "busy_cpu_s": busy_cpu_seconds() - cpu0, "span_s": time.time() - wall0}


def start_cluster() -> tuple[RayHead, dict]:
    cpu0, wall0 = busy_cpu_seconds(), time.time()
    head = RayHead(num_cpus=4, tag="b")
    try:
        head.wait()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return head, {"start_s": time.time() - wall0, "busy_cpu_s": busy_cpu_seconds() - cpu0}


def idle_rate(seconds: float) -> float:
    """Busy CPU seconds per second of the machine with nothing but the cluster up."""
    cpu0 = busy_cpu_seconds()
    time.sleep(seconds)
    return (busy_cpu_seconds() - cpu0) / seconds


def summarize(runs: list[dict], idle: float) -> dict:
    median = lambda key: round(statistics.median(r[key] for r in runs), 2)  # noqa: E731
    own = [r["busy_cpu_s"] - idle * r["span_s"] for r in runs]
    return {"drivers": len(runs), "import_s": median("import_s"), "init_s": median("init_s"),
            "first_actor_s": median("first_actor_s"), "shutdown_s": median("shutdown_s"),
            "driver_s": median("driver_s"), "cpu_s": round(statistics.median(own), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="drivers per way (default 5)")
    parser.add_argument("--name", default="ray_start", help="results file name (default ray_start)")
    args = parser.parse_args()

    head, started = start_cluster()
    try:
        idle = idle_rate(10.0)
        runs: dict[str, list[dict]] = {"local Ray": [], "joined cluster": []}
        for _ in range(args.repeats):
            runs["local Ray"].append(one_driver(""))
            runs["joined cluster"].append(one_driver(head.address))
    finally:
        head.stop()
    ways = {way: summarize(r, idle) for way, r in runs.items()}
    local, joined = ways["local Ray"], ways["joined cluster"]
    result = {"machine": _machine(), "repeats": args.repeats, "idle_cpu_per_s": round(idle, 3),
              "cluster_start": {k: round(v, 2) for k, v in started.items()}, "ways": ways,
              "saved_per_run": {"driver_s": round(local["driver_s"] - joined["driver_s"], 2),
                                "cpu_s": round(local["cpu_s"] - joined["cpu_s"], 2)},
              "raw": runs}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Starting a local Ray vs joining a running cluster", "",
        f"`python -m benchmarks.bench_ray_start --repeats {args.repeats}`: per way {args.repeats} fresh driver processes, "
        "alternating, each `init_ray`, one actor answering once, `ray.shutdown()`. Seconds: medians per phase; "
        f"CPU: the machine's busy CPU-s from the driver's start to {SETTLE_S:.0f} s after its end, less the idle "
        f"machine's {idle:.3f} CPU-s per s (cluster up, nothing running). Machine: {_machine()['cores']} cores.", "",
        "| way | init s | first actor s | shutdown s | driver s (all) | CPU-s |",
        "|---|---|---|---|---|---|",
    ]
    for way, w in ways.items():
        lines.append(f"| {way} | {w['init_s']} | {w['first_actor_s']} | {w['shutdown_s']} | {w['driver_s']} | {w['cpu_s']} |")
    lines += ["", f"Joining saves a run {result['saved_per_run']['driver_s']} s and {result['saved_per_run']['cpu_s']} CPU-s. "
              f"The cluster itself started in {started['start_s']:.1f} s ({started['busy_cpu_s']:.1f} CPU-s), once."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
