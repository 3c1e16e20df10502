"""A bfloat16 checkpoint's parents in the object store: in their own dtype vs upcast to float32.

Checkpoints of 7B-class models mostly ship in bfloat16. numpy, the object store's currency, has
no bfloat16, so every weight set used to be put there as float32 arrays: a bfloat16 run's
parents took twice their size (a 7B base and three experts: 112 GiB where 56 would do).
`workers.SharedState` now keeps each tensor in its own dtype, bfloat16 as its 16-bit patterns.
Members stay float32 either way (`weights.member_dtype`): an evolved step is often smaller
than a bfloat16 weight's rounding.

Both ways side by side in one local Ray, on two bfloat16 parents (a base and a noisy expert)
of SmolLM2-135M and of the 3x model (bench_search's THREE_X, random weights):
- the object store's resident growth when the two parents are published (the raylet's plasma
  pages), and the seconds the driver takes to put them;
- an actor's seconds to make one Evolver offspring of the two into its float32 working weights
  (reading the parents from the store, one thread, as an Evaluator does), alternating, median;
- the driver's seconds to replay, store and publish that offspring as a member
  (`WeightBank.keep`), alternating, median.
The offspring's weights and the stored member's sha256 must be the same both ways (checked):
the arithmetic runs in float32 from the same values.

    python -m benchmarks.bench_parents_dtype            # SmolLM2-135M and 3x, ~4 min
    python -m benchmarks.bench_parents_dtype --quick    # SmolLM2-135M, one repeat, ~40 s (parents_dtype_quick)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_search import (GIB, RESULTS, THREE_X, _machine, _plasma_resident, _proc_title, log,
                                     random_llama_shapes, random_llama_tensor)
from evolve.materialize import materialize
from evolve.recipe import Recipe
from search.run.workers import SharedState, from_numpy_state, init_ray, to_numpy_state

PARENTS = ("base", "expert")


def upcast_state(state: dict[str, torch.Tensor]) -> SharedState:
    """What the object store held before: every tensor as float32."""
    return to_numpy_state({name: tensor.float() for name, tensor in state.items()})


WAYS = {"float32 upcast (before)": upcast_state, "own dtype (now)": to_numpy_state}


def bfloat16_parents(model: str) -> dict[str, dict[str, torch.Tensor]]:
    """{base, expert: bfloat16 state}: the model's weights and a copy with seeded noise of 1% of
    each tensor's std (the 3x model: bench_search's random Llama, SmolLM2's config scaled)."""
    from search.models.sources import load_state, resolve_source

    if model == "3x":
        config, shapes = random_llama_shapes(resolve_source("smollm2-135m"), THREE_X)
        gen = torch.Generator().manual_seed(0)
        base = {n: random_llama_tensor(n, s, config, gen).bfloat16() for n, s in sorted(shapes.items())}
    else:
        base = {n: t.bfloat16() for n, t in load_state(model).items()}
    gen = torch.Generator().manual_seed(1)
    expert = {n: (t.float() + 0.01 * t.float().std().clamp_min(1e-3) * torch.randn(t.shape, generator=gen)).bfloat16()
              for n, t in base.items()}
    return {"base": base, "expert": expert}


class OffspringMaker:
    """An actor's part of a candidate: its float32 working weights, overwritten in place from the
    parents' object-store views."""

    def __init__(self, shapes: dict[str, tuple]):
        torch.set_num_threads(1)
        self.params = {name: torch.zeros(shape) for name, shape in shapes.items()}

    def make(self, recipe: dict, refs: list) -> tuple[float, str]:
        import ray

        start = time.perf_counter()
        weights = {wid: from_numpy_state(ray.get(ref)) for wid, ref in zip(PARENTS, refs)}
        materialize(Recipe.from_dict(recipe), weights, sorted(self.params), out=self.params)
        seconds = time.perf_counter() - start
        digest = hashlib.sha256()
        for name in sorted(self.params):
            digest.update(self.params[name].numpy().tobytes())
        return seconds, digest.hexdigest()


def _raylet_pid() -> int:
    import psutil

    for proc in psutil.Process().children(recursive=True):
        if _proc_title(proc.pid).endswith("/raylet"):
            return proc.pid
    raise RuntimeError("no raylet among this process's children")


def measure(model: str, repeats: int) -> dict:
    import ray

    from search.run.store import RunStore
    from search.run.weights import WeightBank

    parents = bfloat16_parents(model)
    names = sorted(parents["base"])
    checkpoint_bytes = sum(t.numel() * t.element_size() for p in parents.values() for t in p.values())
    init_ray(None, num_cpus=2)
    try:
        raylet = _raylet_pid()
        refs, store, publish_s = {}, {}, {}
        for way, share in WAYS.items():  # one after the other: each way's growth of the store
            before = _plasma_resident(raylet)
            start = time.perf_counter()
            refs[way] = {wid: ray.put(share(parents[wid])) for wid in PARENTS}
            publish_s[way] = time.perf_counter() - start
            store[way] = _plasma_resident(raylet) - before
        shapes = {n: tuple(parents["base"][n].shape) for n in names}
        del parents
        maker = ray.remote(num_cpus=1)(OffspringMaker).remote(shapes)
        made: dict[str, list] = {way: [] for way in WAYS}
        kept: dict[str, list] = {way: [] for way in WAYS}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(repeats + 1):  # the first round warms both ways up and is not counted
                recipe = Recipe(op="evolver", inputs=PARENTS, params={"F": 0.5, "CR": 0.5}, seed=rep)
                for way in (WAYS if rep % 2 == 0 else reversed(list(WAYS))):
                    seconds, digest = ray.get(maker.make.remote(recipe.to_dict(), [refs[way][w] for w in PARENTS]))
                    bank = WeightBank(RunStore(Path(tmp) / way.split()[0]), names, exclude=[], refs=dict(refs[way]))
                    start = time.perf_counter()
                    checksum = bank.keep(recipe, f"g000-{rep:03d}")
                    keep_s = time.perf_counter() - start
                    bank.release(set(PARENTS))
                    bank.store.weights_path(f"g000-{rep:03d}").unlink()
                    if rep:
                        made[way].append((seconds, digest))
                        kept[way].append((keep_s, checksum))
    finally:
        ray.shutdown()
    for rep in range(repeats):  # the same offspring and the same member file, both ways
        ways = list(WAYS)
        assert made[ways[0]][rep][1] == made[ways[1]][rep][1], "the offspring differ between the ways"
        assert kept[ways[0]][rep][1] == kept[ways[1]][rep][1], "the stored members differ between the ways"
    return {
        "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
        "parents_bfloat16_gib": round(checkpoint_bytes / GIB, 3),
        "rows": {way: {"store_growth_gib": round(store[way] / GIB, 3),
                       "publish_s": round(publish_s[way], 3),
                       "make_offspring_s": round(statistics.median(s for s, _ in made[way]), 3),
                       "keep_member_s": round(statistics.median(s for s, _ in kept[way]), 3)} for way in WAYS},
        "same_offspring_and_member": True,
    }


def write_results(result: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    machine = result["machine"]
    lines = ["# A bfloat16 checkpoint's parents in the object store: own dtype vs float32 upcast", "",
             f"`python -m benchmarks.bench_parents_dtype`: two bfloat16 parents per model, both ways side by side "
             f"in one local Ray ({machine['cores']} cores, {machine['memory_gib']} GiB), median of "
             f"{result['repeats']} alternating repeats after a warm one. Store: the raylet's plasma pages that "
             "publishing the two parents added. Offspring: an actor (one thread) makes one Evolver offspring into "
             "its float32 weights from the store. Member: the driver replays it, stores it (float32) and "
             "publishes it. Both ways give the same offspring bits and the same member sha256 (checked).", "",
             "| model | parameters | parents in bfloat16, GiB | object store holds them | store growth, GiB | "
             "publish s | offspring s (actor) | member s (driver) |", "|---|---|---|---|---|---|---|---|"]
    for model, r in result["models"].items():
        lines += [f"| {model} | {r['parameters'] / 1e6:.0f}M | {r['parents_bfloat16_gib']} | {way} | {row['store_growth_gib']} | "
                  f"{row['publish_s']} | {row['make_offspring_s']} | {row['keep_member_s']} |" for way, row in r["rows"].items()]
    lines.append("")
    for model, r in result["models"].items():
        before, now = r["rows"].values()
        lines.append(f"{model}: the store holds the parents in {now['store_growth_gib'] / before['store_growth_gib']:.2f}x the "
                     f"bytes; an actor's offspring takes x{now['make_offspring_s'] / before['make_offspring_s']:.2f} the "
                     f"time, the driver's member x{now['keep_member_s'] / before['keep_member_s']:.2f}.")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,3x", help="comma-separated: smollm2-135m, 3x")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M only, one repeat")
    args = parser.parse_args()
    models, repeats = (["smollm2-135m"], 1) if args.quick else (args.models.split(","), args.repeats)
    result = {"machine": _machine(), "repeats": repeats, "models": {}}
    for model in models:
        log(f"{model}: publishing two bfloat16 parents both ways")
        result["models"][model] = measure(model, repeats)
        log(json.dumps(result["models"][model]))
    name = "parents_dtype_quick" if args.quick else "parents_dtype" if models == ["smollm2-135m", "3x"] else "parents_dtype_partial"
    write_results(result, name)


if __name__ == "__main__":
    main()
