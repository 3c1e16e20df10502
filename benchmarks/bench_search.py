"""Search throughput and memory: in-place overwrite vs reloading a model, candidates per hour, peak memory, replays.

Five measurements:

1. In-place vs reload (issue 2's ratio). One Evolver offspring of two parents is made and the
   working model prepared for scoring, (a) the evofuse way: `materialize` writes each tensor
   straight into the live model's parameters; (b) the naive way: materialise a fresh state
   dict, save it as safetensors, and `from_pretrained` a new model from the directory.
   Median of N alternating repetitions; ratio = reload / in-place.
2. Candidates per hour of a finished run directory (e.g. `runs/demo` after `make demo`), with
   the time split into materialise (actors building weights), score (actors on the dev sets)
   and overhead (everything else: Ray scheduling, journal, selection, checkpoints), from the
   journal's per-candidate timings and the logbook's wall time per generation.

3. Memory (`--memory`): peak memory per process kind during a short real search (`evofuse
   search` in a subprocess: the driver, each `ray::Evaluator` actor, the raylet, the other Ray
   processes, and the object store's shared memory), on SmolLM2-135M and on a model 3x its size
   built from a LlamaConfig (random weights), each with the driver's weights path as it was
   (`legacy`: the replayed member as a whole dict, then its safetensors bytes, then put) and as
   it is (`streaming`: tensor by tensor into the file, put from the memory-mapped file), side by
   side; plus expert fine-tuning in its own process. See `memory_benchmark`.

4. Replaying a generation's new members (`--replay`): between generations the driver replays
   each offspring that joined the population into its safetensors file and the object store
   (`WeightBank.keep_all`) while the actors wait; one at a time (`replay_threads: 1`, as before)
   against side by side (the default: one thread per core, at most four), alternating, same
   recipes, median of N.

5. The demo's memory (`--demo-memory`): `evofuse demo` from start to end in a subprocess (experts
   cached, a fresh run directory) under the same monitor, so the peak resident set that
   `/usr/bin/time -v make demo` reports is taken apart by process and by kind of page: private
   heap, object-store pages mapped, memory-mapped files; and, from the run's journal, what each
   kind of job (split, stage, precision) leaves an actor holding. See `demo_memory`.

    python -m benchmarks.bench_search --quick            # tiny model, seconds
    python -m benchmarks.bench_search --run runs/demo    # SmolLM2-135M + the demo run
    python -m benchmarks.bench_search --memory           # memory, SmolLM2-135M and 3x (~6-10 min)
    python -m benchmarks.bench_search --memory --memory-models tiny   # a smoke test, ~1 min
    python -m benchmarks.bench_search --replay           # 4 new members of SmolLM2-135M (~2 min)
    python -m benchmarks.bench_search --demo-memory      # the whole demo, monitored (~13 min)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from evolve.materialize import materialize
from evolve.recipe import Recipe
from search.models.sources import load_model, load_state

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _noisy_copy(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) * v.std().clamp_min(1e-3) for k, v in state.items()}


def in_place_vs_reload(source: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(source)
    base = load_state(source)
    weights = {"a": _noisy_copy(base, 1), "b": _noisy_copy(base, 2)}
    names = sorted(base)
    params = {n: p.data for n, p in model.state_dict(keep_vars=True).items() if n in base}
    in_place, reload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            recipe = Recipe(op="evolver", inputs=("a", "b"), params={"F": 0.5, "CR": 0.5}, seed=rep)
            start = time.perf_counter()
            materialize(recipe, weights, names, out=params)
            in_place.append(time.perf_counter() - start)

            start = time.perf_counter()
            state = materialize(recipe, weights, names)
            model.save_pretrained(tmp, state_dict=state)
            fresh = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            reload.append(time.perf_counter() - start)
            del fresh, state
    med_in, med_re = statistics.median(in_place), statistics.median(reload)
    return {
        "source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "repeats": repeats,
        "in_place_s": round(med_in, 4),
        "reload_s": round(med_re, 4),
        "reload_over_in_place": round(med_re / med_in, 2),
    }


def replay_side_by_side(source: str, members: int, repeats: int) -> dict:
    """Section 4: `members` Evolver offspring of three parents kept one at a time and side by
    side, alternating, each repetition with fresh recipes (the files are removed after each)."""
    import ray

    from search.run.store import RunStore
    from search.run.weights import WeightBank
    from search.run.workers import init_ray, put_weights

    init_ray(None, num_cpus=os.cpu_count())
    base = load_state(source)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bank = WeightBank(RunStore(Path(tmp)), sorted(base), exclude=[])
            side_by_side = bank.replay_threads  # the default: one per core, at most four
            timings: dict[int, list[float]] = {1: [], side_by_side: []}
            for seed, wid in enumerate(("a", "b", "c"), start=1):
                bank.refs[wid] = put_weights(_noisy_copy(base, seed))
            del base
            for rep in range(repeats):
                for threads in timings:
                    pairs = [("abc"[i % 3], "abc"[(i + 1) % 3]) for i in range(members)]  # target, reference
                    recipes = {f"g{rep:03d}-{threads}{i:02d}": Recipe(op="evolver", inputs=pair, params={"F": 0.5, "CR": 0.5},
                                                                    seed=1000 * rep + 10 * threads + i)
                               for i, pair in enumerate(pairs)}
                    bank.replay_threads = threads
                    start = time.perf_counter()
                    bank.keep_all(recipes)
                    timings[threads].append(time.perf_counter() - start)
                    for member_id in recipes:
                        bank.store.weights_path(member_id).unlink()
                        bank.refs.pop(member_id)
    finally:
        ray.shutdown()
    one, both = statistics.median(timings[1]), statistics.median(timings[side_by_side])
    return {"source": source, "members": members, "repeats": repeats, "threads": side_by_side,
            "one_at_a_time_s": round(one, 3), "side_by_side_s": round(both, 3), "speedup": round(one / both, 2),
            "all_s": {str(k): [round(v, 3) for v in vs] for k, vs in timings.items()}}


def run_throughput(run_dir: Path) -> dict:
    from search.config import load_config
    from search.run.store import RunStore

    store = RunStore(run_dir)
    config = load_config(store.config_path)
    offspring = [e for e in store.read_journal() if e["split"] == "dev" and e["id"].startswith("g") and "timing" in e]
    wall = sum(r["wall_s"] for r in store.read_logbook())
    materialise = sum(e["timing"]["materialize_s"] for e in offspring)
    score = sum(e["timing"]["score_s"] for e in offspring)
    workers = config.workers.count
    busy_capacity = wall * workers  # actor-seconds available during the generations
    return {
        "run": str(run_dir),
        "workers": workers,
        "candidates": len(offspring),
        "generation_wall_s": round(wall, 2),
        "candidates_per_hour": round(len(offspring) / wall * 3600, 1) if wall else None,
        "materialize_share": round(materialise / busy_capacity, 3) if wall else None,
        "score_share": round(score / busy_capacity, 3) if wall else None,
        "overhead_share": round(1 - (materialise + score) / busy_capacity, 3) if wall else None,
        "mean_materialize_s": round(materialise / max(1, len(offspring)), 3),
        "mean_score_s": round(score / max(1, len(offspring)), 3),
    }


# ---- 3. memory: peak memory per process kind during a short real search --------------------
#
# Each run is `evofuse search` (the CLI's own entry point) in a subprocess whose process tree is
# sampled every SAMPLE_S seconds from /proc: VmRSS / VmHWM (what `/usr/bin/time -v` reports as
# maximum resident set; VmHWM is the kernel's exact peak), RssAnon (private heap: what a
# process really costs), RssShmem (object-store pages it has mapped: shared, counted once under
# "object store") and RssFile (memory-mapped files: page cache, reclaimable). The object store's
# own figure is the resident size of the plasma file(s) in /dev/shm that the raylet holds
# open. "All processes" is the peak over time of (sum of RssAnon) + object store, the memory the
# run actually occupies (page cache aside).
#
# The search: base + two experts (noisy copies of the base, 0.01 std, as bench_merge), one
# linear seed merge (replayed on the driver: the path under test), two actors, no
# generations (so the object store holds exactly 3 parents + 1 member and both paths do the
# same work), a 16-document perplexity task. Before the driver replays the seed, each actor
# scores the base once (as every later generation's replay happens while the actors hold
# overwritten working models), and the driver records when it publishes the parents and keeps
# (replays, stores, publishes) a member.

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


MEMORY_SAMPLE_S = 0.2
MEMORY_STATUS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
# SmolLM2-135M's shapes scaled to ~3x its parameters (412M vs 135M), same style: grouped-query
# attention with 64-dim heads (16 query over 4 key/value heads), 30 blocks, tied embeddings,
# the same 49152-token vocabulary; random weights, a byte tokenizer.
THREE_X = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=4, head_dim=64)
# the demo's pydoc expert, one step (the optimizer state and the activations peak in the first)
FINETUNE_PROBE = dict(data="pydoc:train", steps=1, lr=5e-4, batch_size=4, seq_len=128, lora_rank=16)
GIB = 2**30


def _proc_status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in MEMORY_STATUS:
            fields[key] = int(value.split()[0]) * 1024
    return fields if len(fields) == len(MEMORY_STATUS) else None


def _proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _plasma_resident(raylet_pid: int) -> int:
    """Resident bytes of the object store: the plasma files (in /dev/shm, unlinked) the raylet
    holds open, by their allocated blocks (tmpfs allocates a page when it is first written)."""
    total = 0
    try:
        fds = list(Path(f"/proc/{raylet_pid}/fd").iterdir())
    except OSError:
        return 0
    for fd in fds:
        try:
            if "plasma" in os.readlink(fd):
                total += os.stat(fd).st_blocks * 512
        except OSError:
            continue
    return total


class TreeMonitor(threading.Thread):
    """Samples the memory of a process and all its descendants until stopped."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root = root_pid
        self.done = threading.Event()
        self.procs: dict[int, dict] = {}  # pid -> kind, title, peak of each status field
        self.timeline: list[dict] = []  # per sample: time, the driver's fields, actors' anon, store, total
        self.peak_store = 0
        self.peak_total = 0

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.root)
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            self._sample(tree)
            self.done.wait(MEMORY_SAMPLE_S)

    def _sample(self, tree) -> None:
        now, anon, store, driver = time.time(), 0, 0, None
        actors_anon = 0
        for proc in tree:
            status = _proc_status(proc.pid)
            if status is None:
                continue
            title = _proc_title(proc.pid)
            record = self.procs.setdefault(proc.pid, {"kind": None, **{f: 0 for f in MEMORY_STATUS}})
            if record["kind"] != "actor":  # a worker is an actor from the moment it shows the title
                record["kind"] = ("driver" if proc.pid == self.root else "actor" if title.startswith("ray::Evaluator")
                                  else "raylet" if title.endswith("/raylet") else "other")
            record["title"] = Path(title).name[:40]
            for field in MEMORY_STATUS:
                record[field] = max(record[field], status[field])
            anon += status["RssAnon"]
            if record["kind"] == "actor":
                actors_anon += status["RssAnon"]
            if record["kind"] == "raylet":
                store = _plasma_resident(proc.pid)
            if proc.pid == self.root:
                driver = status
        self.peak_store = max(self.peak_store, store)
        self.peak_total = max(self.peak_total, anon + store)
        if driver is not None:
            self.timeline.append({"t": now, **{f"driver_{k}": v for k, v in driver.items()},
                                  "actors_anon": actors_anon, "store": store, "total": anon + store})

    def stop(self) -> None:
        self.done.set()
        self.join()


def _run_monitored(command: list[str], log: Path, env: dict | None = None) -> tuple[int, TreeMonitor, float]:
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        monitor = TreeMonitor(proc.pid)
        monitor.start()
        code = proc.wait()
        monitor.stop()
    return code, monitor, time.perf_counter() - start


def _legacy_save_weights(store, member_id: str, state: dict) -> str:
    """`RunStore.save_weights` before streaming, verbatim: the whole file's bytes in memory."""
    from safetensors.torch import save

    from compression.loader import atomic_write_bytes

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata={"format": "pt"})
    atomic_write_bytes(store.weights_path(member_id), data)
    return hashlib.sha256(data).hexdigest()


def _legacy_keep(self, recipe, member_id: str) -> str:
    """`WeightBank.keep` before streaming, verbatim: the whole replayed dict, its bytes, put."""
    import ray

    from search.run.workers import from_numpy_state, put_weights

    inputs = {wid: from_numpy_state(ray.get(self.refs[wid])) for wid in recipe.input_ids()}
    weights = materialize(recipe, inputs, self.names, self.exclude)
    checksum = _legacy_save_weights(self.store, member_id, weights)
    self.refs[member_id] = put_weights(weights)
    return checksum


def memory_driver(config: str, run_dir: str, events: str, legacy: bool) -> int:
    """The search's driver process: `evofuse search`, with the weights path chosen and the
    publish / keep phases timed into `events` (JSON lines)."""
    from search.cli import main as cli_main
    from search.run.loop import Search
    from search.run.weights import WeightBank

    if legacy:
        WeightBank.keep = _legacy_keep

    def timed(phase, method):
        """Also the phase's exact peak: the kernel's VmHWM, reset to VmRSS when it starts."""
        def wrapper(*args, **kwargs):
            start, before = time.time(), _proc_status(os.getpid())
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            try:
                return method(*args, **kwargs)
            finally:
                after = _proc_status(os.getpid())
                event = {"phase": phase, "start": start, "end": time.time(),
                         "hwm_growth": after["VmHWM"] - before["VmRSS"], "anon_after": after["RssAnon"] - before["RssAnon"]}
                with open(events, "a") as handle:
                    handle.write(json.dumps(event) + "\n")
        return wrapper

    WeightBank.publish_parents = timed("publish", WeightBank.publish_parents)
    WeightBank.keep = timed("keep", WeightBank.keep)
    start = Search.start

    def start_and_warm(self):
        """Every actor scores the base once before the seed is replayed, so that its working
        model has been overwritten in place (its own memory from then on, no longer the
        template's memory-mapped file): every later generation replays its accepted offspring
        while the actors hold theirs."""
        import ray

        from search.run.candidate import Candidate
        from search.run.workers import ScoreJob

        start(self)
        base = self.config.parents.base.name
        job, refs = ScoreJob(Candidate.copy_of(base)), {base: self.weights.refs[base]}
        ray.get([actor.evaluate.remote(job, refs) for actor in self.pool.actors])

    Search.start = start_and_warm
    return cli_main(["search", config, "--run-dir", run_dir, "--quiet"])


def finetune_probe(model_dir: Path) -> int:
    """Expert fine-tuning as `resolve_parents` runs it (the demo's LoRA settings, one step):
    prints the process's memory after loading the model, its kernel-measured peak, and what it
    keeps once `finetune` returns, as before (`finetune` did not give glibc's freed heap back:
    its `malloc_trim` is switched off here) and as now (the same trim, called right after)."""
    import ctypes

    from search.config import FineTune
    from search.models.experts import finetune
    from search.models.sources import load_model

    model, tokenizer = load_model(str(model_dir))
    loaded = _proc_status(os.getpid())
    start = time.perf_counter()
    real_cdll = ctypes.CDLL

    def no_libc(name, *args, **kwargs):
        if "libc" in str(name):
            raise OSError("malloc_trim switched off by the probe")
        return real_cdll(name, *args, **kwargs)

    ctypes.CDLL = no_libc
    try:
        finetune(model, tokenizer, FineTune(**FINETUNE_PROBE), label="probe", quiet=True)
    finally:
        ctypes.CDLL = real_cdll
    seconds = round(time.perf_counter() - start, 1)
    untrimmed = _proc_status(os.getpid())
    real_cdll("libc.so.6").malloc_trim(0)
    trimmed = _proc_status(os.getpid())
    print("PROBE " + json.dumps({"loaded": loaded, "untrimmed": untrimmed, "trimmed": trimmed, "seconds": seconds}))
    return 0


def _write_noisy_copy(src: Path, out: Path, seed: int, scale: float = 0.01) -> None:
    """A parent: the base's files, its tensors plus seeded noise of `scale` times each tensor's
    std, written tensor by tensor."""
    from search.models.tensors import SafetensorsSource, write_safetensors_streaming

    out.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and not file.name.endswith(".index.json"):
            shutil.copy2(file, out / file.name)
    source = SafetensorsSource(src)
    gen = torch.Generator().manual_seed(seed)
    buffer: list = [None]

    def produce(name: str) -> torch.Tensor:
        tensor, buffer[0] = source.read(name, buffer[0])
        return tensor + scale * torch.randn(tensor.shape, generator=gen) * tensor.std().clamp_min(1e-3)

    specs = [(n, info.dtype, info.shape) for n, info in sorted(source.tensors.items())]
    write_safetensors_streaming(out / "model.safetensors", specs, produce)
    source.close()


def random_llama_shapes(template: Path, overrides: dict):
    """`template`'s config with `overrides` and a byte tokenizer's special ids, and the shapes of
    its weights (tied embeddings counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(template))
    for key, value in {**overrides, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": None}.items():
        setattr(config, key, value)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return config, shapes


def random_llama_tensor(name: str, shape: tuple, config, gen: torch.Generator) -> torch.Tensor:
    """A random Llama's float32 tensor: norms 1, everything else N(0, initializer_range)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * config.initializer_range


def _write_random_llama(out: Path, template: Path, overrides: dict, seed: int = 0) -> None:
    """A random Llama of `template`'s config with `overrides` (`random_llama_tensor`), written
    tensor by tensor, with a byte tokenizer."""
    from search.models.tensors import write_safetensors_streaming
    from search.models.tiny import byte_tokenizer

    config, shapes = random_llama_shapes(template, overrides)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(out / "model.safetensors", [(n, torch.float32, s) for n, s in sorted(shapes.items())],
                                lambda name: random_llama_tensor(name, shapes[name], config, gen))
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)


def _prepare_parents(model: str, workdir: Path) -> tuple[dict[str, Path], int]:
    """{base, a, b: model directory}, and the bytes of one model's weights."""
    from search.models.sources import resolve_source, safetensors_files

    root = workdir / model
    if model == "3x":
        base = root / "base"
        if not (base / "config.json").is_file():
            log(f"writing a random 3x model to {base}")
            _write_random_llama(base, resolve_source("smollm2-135m"), THREE_X)
    else:
        base = resolve_source("tiny-llama" if model == "tiny" else model)
    dirs = {"base": base}
    for seed, name in enumerate(("a", "b"), start=1):
        dirs[name] = root / name
        if not (dirs[name] / "config.json").is_file():
            log(f"writing noisy copy {dirs[name]}")
            _write_noisy_copy(base, dirs[name], seed)
    return dirs, sum(f.stat().st_size for f in safetensors_files(base))


def _memory_config(name: str, dirs: dict[str, Path]) -> str:
    return "\n".join([
        f"name: {name}",
        "seed: 0",
        "parents:",
        f"  base: {{name: base, source: {dirs['base']}}}",
        "  experts:",
        f"    - {{name: a, source: {dirs['a']}}}",
        f"    - {{name: b, source: {dirs['b']}}}",
        "tasks:",
        '  - {name: arith, kind: perplexity, dev: "arithmetic:dev", test: "arithmetic:test", options: {subsample: 16}}',
        "evolver:",
        "  generations: 0",
        "  seeds: [{name: linear, op: linear, params: {weight: 1.0}}]",
        "workers: {count: 2, num_cpus: 1}",
        "export_top: 0",
        "",
    ])


def _wait_for_memory(needed: int, patience_s: float = 180) -> bool:
    import psutil

    deadline = time.time() + patience_s
    while psutil.virtual_memory().available < needed:
        if time.time() > deadline:
            return False
        time.sleep(5)
    return True


def _phase_peaks(monitor: TreeMonitor, events: list[dict]) -> dict:
    """Per driver phase: its private (anon) and resident growth over the sample just before it."""
    out = {}
    for event in events:
        before = [s for s in monitor.timeline if s["t"] <= event["start"]]
        during = [s for s in monitor.timeline if event["start"] <= s["t"] <= event["end"] + MEMORY_SAMPLE_S]
        if not before or not during:
            continue
        base = before[-1]
        phase = out.setdefault(event["phase"], {"count": 0, "seconds": 0.0, "anon_growth": 0, "rss_growth": 0,
                                                "file_growth": 0, "shmem_growth": 0})
        phase["count"] += 1
        phase["seconds"] += round(event["end"] - event["start"], 2)
        for key, field in (("anon_growth", "RssAnon"), ("file_growth", "RssFile"), ("shmem_growth", "RssShmem")):
            phase[key] = max(phase[key], max(s[f"driver_{field}"] for s in during) - base[f"driver_{field}"])
        phase["rss_growth"] = max(phase["rss_growth"], event.get("hwm_growth", 0))  # exact (kernel)
    return out


def _summarise(monitor: TreeMonitor) -> dict:
    kinds: dict[str, dict] = {}
    actors = sorted(pid for pid, r in monitor.procs.items() if r["kind"] == "actor")
    for pid, record in sorted(monitor.procs.items()):
        peaks = {"peak_rss": record["VmHWM"], "peak_anon": record["RssAnon"], "peak_shmem": record["RssShmem"],
                 "peak_file": record["RssFile"]}
        if record["kind"] == "actor":
            kinds[f"actor {actors.index(pid) + 1}"] = peaks
        elif record["kind"] == "other":
            other = kinds.setdefault("other Ray processes", {k: 0 for k in peaks} | {"processes": 0})
            other["processes"] += 1
            for k, v in peaks.items():
                other[k] += v  # a sum of per-process peaks: an upper bound
        else:
            kinds[record["kind"]] = peaks
    return kinds


def run_memory_case(model: str, path: str, dirs: dict[str, Path], model_bytes: int, workdir: Path) -> dict:
    from search.run.store import RunStore

    name = f"memory-{model}-{path}"
    case = workdir / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    config = case / "config.yaml"
    config.write_text(_memory_config(name, dirs))
    events = case / "events.jsonl"
    # the object store holds 4 models here; Ray's default cap (30% of available memory) may be
    # less on a busy machine, and a spill to disk would hide what the store needs
    env = {**os.environ, "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.5", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "benchmarks.bench_search", "--_driver", str(config), str(case / "run"), str(events)]
    if path == "legacy":
        command.append("--_legacy")
    load = os.getloadavg()[0]
    log(f"{name}: evofuse search (load {load:.2f})")
    code, monitor, wall = _run_monitored(command, case / "driver.log", env)
    if code != 0:
        tail = (case / "driver.log").read_text()[-3000:]
        raise RuntimeError(f"{name}: the search failed (exit {code}):\n{tail}")
    phases = [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []
    failed = [e for e in RunStore(case / "run").read_journal() if e.get("status") != "ok"]
    if failed:  # actors that never scored hold no working model: the figures would mean nothing
        raise RuntimeError(f"{name}: {len(failed)} evaluations did not succeed, e.g. {failed[0].get('reason')}")
    state = json.loads((case / "run" / "state.json").read_text())
    return {
        "model": model,
        "path": path,
        "model_bytes": model_bytes,
        "wall_s": round(wall, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "kinds": _summarise(monitor),
        "object_store_peak": monitor.peak_store,
        "all_processes_peak": monitor.peak_total,
        "driver_phases": _phase_peaks(monitor, phases),
        "weight_checksums": state["weight_checksums"],
        "samples": len(monitor.timeline),
    }


def run_finetune_probe(model: str, base: Path, workdir: Path) -> dict:
    log(f"{model}: expert fine-tune probe")
    code, monitor, wall = _run_monitored([sys.executable, "-m", "benchmarks.bench_search", "--_finetune", str(base)],
                                         workdir / f"finetune-{model}.log")
    text = (workdir / f"finetune-{model}.log").read_text()
    probe = next((json.loads(line[6:]) for line in text.splitlines() if line.startswith("PROBE ")), None)
    if code != 0 or probe is None:
        raise RuntimeError(f"{model}: the fine-tune probe failed (exit {code}):\n{text[-3000:]}")
    record = monitor.procs.get(monitor.root, {})
    return {
        "settings": FINETUNE_PROBE,
        "after_load_rss": probe["loaded"]["VmRSS"],
        "after_load_anon": probe["loaded"]["RssAnon"],
        "peak_rss": probe["trimmed"]["VmHWM"],
        "peak_anon": max(record.get("RssAnon", 0), probe["untrimmed"]["RssAnon"]),
        "kept_anon_before": probe["untrimmed"]["RssAnon"],  # once finetune returned, no malloc_trim
        "kept_anon_now": probe["trimmed"]["RssAnon"],
        "train_s": probe["seconds"],
        "wall_s": round(wall, 1),
    }


def memory_benchmark(models: list[str], paths: list[str], workdir: Path | None) -> dict:
    """Measure `models`; their entries replace those of the same models in
    results/search_memory.json (the others are kept, each entry says when it was measured)."""
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="evofuse-bench-memory-")) if own_dir else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / f"{_memory_results_name(models)}.json"
    result: dict = {"machine": _machine(), "settings": {
        "search": "base + 2 noisy experts (0.01 std), 1 linear seed merge replayed on the driver once each actor "
                  "has scored the base (its working model overwritten in place, as in every generation after the "
                  "first), generations 0, 2 actors x 1 CPU, fp32, perplexity on 16 arithmetic:dev documents",
        "sample_s": MEMORY_SAMPLE_S, "object_store_memory_proportion": 0.5, "three_x": THREE_X,
    }, "models": json.loads(previous.read_text()).get("models", {}) if previous.is_file() else {}}
    try:
        for model in models:
            started = time.perf_counter()
            dirs, model_bytes = _prepare_parents(model, workdir)
            entry = result["models"][model] = {"model_bytes": model_bytes, "runs": {},
                                               "measured": time.strftime("%Y-%m-%d %H:%M"),
                                               "load_at_start": round(os.getloadavg()[0], 2)}
            for path in paths:
                needed = int(model_bytes * (4 + 2 * 1.4 + (2.3 if path == "legacy" else 0.3)) + 1.5 * GIB)
                if not _wait_for_memory(needed):
                    entry["runs"][path] = {"skipped": f"less than {needed / GIB:.1f} GiB available"}
                    log(f"{model} {path}: skipped, not enough free memory")
                    continue
                entry["runs"][path] = run_memory_case(model, path, dirs, model_bytes, workdir)
            entry["finetune"] = run_finetune_probe(model, dirs["base"], workdir)
            runs = [r for r in entry["runs"].values() if "weight_checksums" in r]
            entry["same_weights"] = len({json.dumps(r["weight_checksums"], sort_keys=True) for r in runs}) <= 1
            entry["wall_s"] = round(time.perf_counter() - started, 1)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_memory_results(result, _memory_results_name(models))
    return result


def _memory_results_name(models: list[str]) -> str:
    return "search_memory_quick" if set(models) == {"tiny"} else "search_memory"


def _machine() -> dict:
    import platform

    import psutil

    return {"cpu": platform.machine(), "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1)}


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


KIND_ORDER = {"driver": 0, "raylet": 50, "other Ray processes": 60}  # actors (10) between


def _kind_label(kind: str, record: dict) -> str:
    """A process kind as a table row names it: summed kinds say how many processes they sum."""
    return f"{kind} ({record['processes']}, sum of peaks)" if "processes" in record else kind


def _memory_rows(runs: dict[str, dict]) -> list[tuple[str, list]]:
    """(label, [(peak RSS, peak private) per path]) rows of one model's table."""
    labels = []
    for run in runs.values():
        for kind in run.get("kinds", {}):
            if kind not in labels:
                labels.append(kind)
    labels.sort(key=lambda k: KIND_ORDER.get(k, 10))
    rows = []
    for kind in labels:
        cells = []
        for run in runs.values():
            k = run.get("kinds", {}).get(kind)
            cells.append((k["peak_rss"], k["peak_anon"], k["peak_shmem"]) if k else (None, None, None))
        record = next((r["kinds"][kind] for r in runs.values() if kind in r.get("kinds", {})), {})
        rows.append((_kind_label(kind, record), cells))
    rows.append(("driver while keeping one member (growth)",
                 [(r.get("driver_phases", {}).get("keep", {}).get("rss_growth"),
                   r.get("driver_phases", {}).get("keep", {}).get("anon_growth"), None) for r in runs.values()]))
    rows.append(("driver while publishing the parents (growth)",
                 [(r.get("driver_phases", {}).get("publish", {}).get("rss_growth"),
                   r.get("driver_phases", {}).get("publish", {}).get("anon_growth"), None) for r in runs.values()]))
    rows.append(("object store (/dev/shm resident)", [(None, r.get("object_store_peak"), None) for r in runs.values()]))
    rows.append(("**all processes: private + object store**", [(None, r.get("all_processes_peak"), None) for r in runs.values()]))
    return rows


def write_memory_results(result: dict, name: str = "search_memory") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    lines = [
        "# Search memory: peak per process kind, SmolLM2-135M and a 3x model",
        "",
        "Command: `python -m benchmarks.bench_search --memory` (both models; `--memory-models 3x` measures one and "
        f"keeps the other's entry). Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, shared with other "
        f"jobs (each model's load average below). Search: {result['settings']['search']}. The object store may use "
        f"{result['settings']['object_store_memory_proportion']:.0%} of available memory (Ray's default 30% could spill "
        f"the 3x run's four models to disk). Sampled every {result['settings']['sample_s']} s from /proc; a phase's RSS "
        "growth is the kernel's exact peak (VmHWM reset when the phase starts).",
        "",
        "`legacy` = the driver's weights path before this change (replayed member built as a whole dict, "
        "serialised to bytes by `safetensors.torch.save`, then `put` from the dict); `streaming` = now (each "
        "tensor materialised and written before the next, the file then put into the object store "
        "memory-mapped). Everything else is the same code.",
        "",
        "Columns, GiB: **RSS** = the process's peak resident set (VmHWM, what `/usr/bin/time -v` reports); it "
        "counts the object-store pages the process has mapped (shm) and memory-mapped files, so RSS of "
        "different processes overlaps. **private** = peak RssAnon, the process's own heap: what it adds. "
        "**shm** = peak object-store pages mapped. The object store row is the resident size of the plasma "
        "file; the last row is the peak over time of all private memory plus the object store.",
        "",
    ]
    for model, entry in result["models"].items():
        runs = {p: r for p, r in entry["runs"].items() if "kinds" in r}
        lines += [f"## {model} ({entry['model_bytes'] / 1e9:.2f} GB of fp32 weights per model)", "",
                  f"Measured {entry.get('measured', '?')}, {entry.get('wall_s', '?')} s with the fine-tune probe, "
                  f"load average {entry.get('load_at_start', '?')} at the start.", ""]
        skipped = {p: r["skipped"] for p, r in entry["runs"].items() if "skipped" in r}
        if skipped:
            lines += [f"Skipped: {skipped}", ""]
        if runs:
            header = "| process | " + " | ".join(f"{p}: RSS | {p}: private | {p}: shm" for p in runs) + " |"
            lines += [header, "|---|" + "---|---|---|" * len(runs)]
            for label, cells in _memory_rows(runs):
                lines.append(f"| {label} | " + " | ".join(f"{_gib(a)} | {_gib(b)} | {_gib(c)}" for a, b, c in cells) + " |")
            lines += ["", "Wall time / load: " + ", ".join(
                f"{p} {r['wall_s']} s (load {r['load_before']} -> {r['load_after']})" for p, r in runs.items())
                + f". Stored weights identical across paths (sha256): **{entry['same_weights']}**.", ""]
        ft = entry.get("finetune")
        if ft:
            lines += [f"Expert fine-tuning (`finetune` in its own process, the demo's settings {ft['settings']}): "
                      f"after loading the model RSS {_gib(ft['after_load_rss'])} GiB (private {_gib(ft['after_load_anon'])}: "
                      f"the weights are memory-mapped); peak RSS {_gib(ft['peak_rss'])} GiB (private "
                      f"{_gib(ft['peak_anon'])}: activations of one step); private once `finetune` returns "
                      f"(the merged weights are copied-on-write by then): before {_gib(ft['kept_anon_before'])} GiB, "
                      f"now {_gib(ft['kept_anon_now'])} GiB (freed heap handed back). {ft['train_s']} s for one step.", ""]
    models = [m for m in result["models"] if m in ("smollm2-135m", "3x")]
    if len(models) == 2:
        lines += _growth_lines(result["models"]["smollm2-135m"], result["models"]["3x"])
    lines += [
        "## Reading",
        "",
        "- What grows with the model: the object store (parents once per node + live members, fp32), each "
        "actor's one working model (+ a few temporaries of the largest tensor while it materialises), and "
        "expert fine-tuning's activations. What does not: the driver's own memory (streaming), the raylet and "
        "the other Ray processes.",
        "- The driver's RSS stays near the object store's size: it counts the shared pages the driver wrote "
        "into the store (shm column) and the memory-mapped files it put from; neither is memory of its own.",
        "- `driver while keeping one member`: legacy holds the replayed dict and the serialised file twice "
        "(`safetensors.torch.save` fills its own buffer, then copies it into a Python bytes object; 2x a "
        "state's size at its peak, measured): about three models at once. Streaming holds one output tensor "
        "(the largest is the embedding) and the operator's temporaries; its RSS growth is the member's "
        "file, mapped for the put, and the store pages it writes.",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _growth_lines(small: dict, large: dict) -> list[str]:
    lines = ["## Growth with model size (3x model / SmolLM2-135M)", "",
             f"Weights: {large['model_bytes'] / small['model_bytes']:.2f}x.", "",
             "| process | path | SmolLM2-135M private | 3x private | ratio |", "|---|---|---|---|---|"]
    for path in ("legacy", "streaming"):
        a, b = small["runs"].get(path, {}), large["runs"].get(path, {})
        if "kinds" not in a or "kinds" not in b:
            continue
        pairs = [(k, a["kinds"][k]["peak_anon"], b["kinds"][k]["peak_anon"]) for k in a["kinds"] if k in b["kinds"]]
        pairs.append(("driver keep growth", a["driver_phases"].get("keep", {}).get("anon_growth", 0),
                      b["driver_phases"].get("keep", {}).get("anon_growth", 0)))
        pairs.append(("object store", a["object_store_peak"], b["object_store_peak"]))
        pairs.append(("all processes", a["all_processes_peak"], b["all_processes_peak"]))
        for kind, x, y in pairs:
            lines.append(f"| {kind} | {path} | {_gib(x)} | {_gib(y)} | {y / x:.2f}x |" if x else f"| {kind} | {path} | {_gib(x)} | {_gib(y)} | - |")
    fa, fb = small.get("finetune"), large.get("finetune")
    if fa and fb:
        lines.append(f"| expert fine-tune | - | {_gib(fa['peak_anon'])} | {_gib(fb['peak_anon'])} | {fb['peak_anon'] / fa['peak_anon']:.2f}x |")
    return lines + [""]


def demo_memory(run_dir: Path) -> dict:
    """`evofuse demo` into a fresh `run_dir`, every process of it sampled: per process kind its
    peak resident set (VmHWM: what `time -v` reports for the largest process) and the peak of
    each kind of page it holds, the object store's resident size, and the peak over time of all
    private memory plus the store (what the machine pays: shared pages once)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    command = [sys.executable, "-m", "search.cli", "demo", "--run-dir", str(run_dir), "--quiet"]
    code, monitor, wall = _run_monitored(command, log)
    if code != 0:
        raise SystemExit(f"evofuse demo exited {code}: see {log}")
    kinds = _summarise(monitor)
    largest = max((k for k in kinds if "processes" not in kinds[k]), key=lambda k: kinds[k]["peak_rss"])
    return {"machine": _machine(), "measured": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(wall, 1),
            "sample_s": MEMORY_SAMPLE_S, "kinds": kinds, "largest": largest,
            "object_store_peak": monitor.peak_store, "all_processes_peak": monitor.peak_total,
            "memory_by_job_kind": memory_by_job_kind(run_dir)}


def memory_by_job_kind(run_dir: Path) -> list[dict]:
    """Per kind of job (split, stage, precision), from the run's journal: each row carries its
    actor's memory after the job (private heap and resident set) and the most that actor has
    held (VmHWM, which only grows, object-store pages included), so a job whose peak exceeds
    the actor's previous row's raised it by the difference."""
    from search.run.store import RunStore

    last_peak: dict[str, float] = {}
    kinds: dict[tuple, dict] = {}
    for row in RunStore(run_dir).read_journal():
        memory = row.get("memory")
        if not memory:
            continue
        key = (row["split"], row.get("stage"), row.get("autocast") or "float32")
        kind = kinds.setdefault(key, {"split": key[0], "stage": key[1], "precision": key[2], "jobs": 0,
                                      "private_max_gib": 0.0, "raised_peak": 0, "largest_raise_gib": 0.0})
        raise_gib = memory["peak_gib"] - last_peak.get(row["worker"], memory["peak_gib"])  # an actor's first job: none
        kind["jobs"] += 1
        kind["private_max_gib"] = max(kind["private_max_gib"], memory["private_gib"])
        if raise_gib > 0:
            kind["raised_peak"] += 1
            kind["largest_raise_gib"] = round(max(kind["largest_raise_gib"], raise_gib), 3)
        last_peak[row["worker"]] = max(last_peak.get(row["worker"], 0.0), memory["peak_gib"])
    return sorted(kinds.values(), key=lambda k: (k["split"], -1 if k["stage"] is None else k["stage"]))


def write_demo_memory(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo_memory.json").write_text(json.dumps(result, indent=1))
    m, kinds = result["machine"], result["kinds"]
    lines = [
        "# The demo's memory, by process",
        "",
        "Command: `python -m benchmarks.bench_search --demo-memory` (`evofuse demo` into a fresh run "
        f"directory, experts cached). Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; measured "
        f"{result['measured']}, {result['wall_s']} s. Every process of the demo sampled every {result['sample_s']} s "
        "from /proc; peak RSS is the kernel's exact high-water mark.",
        "",
        "Columns, GiB: **peak RSS** = VmHWM, what `/usr/bin/time -v` reports for the largest process; it counts "
        "pages shared with other processes, so the rows overlap. Then the sampled peak of each kind of page: "
        "**private** (RssAnon, the process's own heap), **object store** (RssShmem, plasma pages it has "
        "mapped) and **files** (RssFile, memory-mapped safetensors and libraries).",
        "",
        "| process | peak RSS | private | object store | files |",
        "|---|---|---|---|---|",
    ]
    for kind in sorted(kinds, key=lambda k: KIND_ORDER.get(k, 10)):
        k = kinds[kind]
        name = _kind_label(kind, k)
        name = f"**{name}** (the largest)" if kind == result["largest"] else name
        lines.append(f"| {name} | {_gib(k['peak_rss'])} | {_gib(k['peak_anon'])} | {_gib(k['peak_shmem'])} | "
                     f"{_gib(k['peak_file'])} |")
    lines += [
        f"| object store (/dev/shm resident) | | | {_gib(result['object_store_peak'])} | |",
        f"| **all processes: private + object store, peak over time** | | {_gib(result['all_processes_peak'])} | | |",
        "",
    ]
    kinds = result.get("memory_by_job_kind")
    if kinds:
        lines += [
            "By kind of job, from the run's journal: after each job an actor journals its private heap (with "
            "the freed heap glibc keeps for the next job), its resident set and its peak so far (VmHWM, which "
            "counts the object-store pages it has mapped: each weight set an actor reads adds its pages). GiB:",
            "",
            "| split | stage | precision | jobs | most private heap held after one | jobs that raised their actor's peak | largest raise |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {k['split']} | {'-' if k['stage'] is None else k['stage']} | {k['precision']} | {k['jobs']} | "
                  f"{k['private_max_gib']:.2f} | {k['raised_peak']} | {k['largest_raise_gib']:.2f} |" for k in kinds]
        lines.append("")
    (RESULTS / "demo_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


def write_replay_results(r: dict, quick: bool) -> None:
    name = "search_replay_quick" if quick else "search_replay"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**r, "machine": _machine()}, indent=1))
    lines = [f"# Replaying a generation's new members ({r['source']}, {r['members']} members, median of {r['repeats']})", "",
             "| replay | median s |", "|---|---|",
             f"| one at a time | {r['one_at_a_time_s']} |",
             f"| side by side ({r['threads']} threads) | {r['side_by_side_s']} |",
             f"| **speedup** | **{r['speedup']}x** |", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", type=Path, help="a finished run directory to report throughput for")
    parser.add_argument("--memory", action="store_true", help="only the memory benchmark (section 3)")
    parser.add_argument("--replay", action="store_true", help="only the replay benchmark (section 4)")
    parser.add_argument("--members", type=int, default=4, help="--replay: new members per generation")
    parser.add_argument("--demo-memory", action="store_true", help="only the demo's memory by process (section 5)")
    parser.add_argument("--memory-models", default="smollm2-135m,3x",
                        help="comma-separated: smollm2-135m, 3x (SmolLM2 x3 from a LlamaConfig), tiny")
    parser.add_argument("--memory-paths", default="legacy,streaming", help="comma-separated: legacy, streaming")
    parser.add_argument("--workdir", type=Path, help="where the parents and runs are written (default: a temporary directory, removed)")
    parser.add_argument("--_driver", nargs=3, metavar=("CONFIG", "RUN_DIR", "EVENTS"), help=argparse.SUPPRESS)
    parser.add_argument("--_legacy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_finetune", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._driver:
        raise SystemExit(memory_driver(*args._driver, legacy=args._legacy))
    if args._finetune:
        raise SystemExit(finetune_probe(Path(args._finetune)))
    if args.demo_memory:
        write_demo_memory(demo_memory((args.workdir or ROOT / "benchmarks" / ".work") / "demo-memory"))
        return
    if args.memory:
        memory_benchmark(args.memory_models.split(","), args.memory_paths.split(","), args.workdir)
        return
    torch.set_num_threads(2)
    source = "tiny-llama" if args.quick else "smollm2-135m"
    if args.replay:
        write_replay_results(replay_side_by_side(source, args.members, args.repeats), quick=args.quick)
        return
    result = {"in_place_vs_reload": in_place_vs_reload(source, args.repeats)}
    if args.run:
        result["throughput"] = run_throughput(args.run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "search_quick" if args.quick else "search"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Search benchmark ({'quick: tiny model' if args.quick else 'SmolLM2-135M'})", ""]
    r = result["in_place_vs_reload"]
    lines += [
        "| preparing one Evolver offspring for scoring | median s |",
        "|---|---|",
        f"| in place (materialise into the live model) | {r['in_place_s']} |",
        f"| reload (materialise, save safetensors, from_pretrained) | {r['reload_s']} |",
        f"| **ratio reload / in place** | **{r['reload_over_in_place']}x** |",
        "",
    ]
    if "throughput" in result:
        t = result["throughput"]
        lines += [
            f"Run `{t['run']}` ({t['workers']} workers): **{t['candidates_per_hour']} candidates/hour**; "
            f"actor time split: materialise {t['materialize_share']:.1%}, score {t['score_share']:.1%}, "
            f"overhead {t['overhead_share']:.1%} (mean per candidate: materialise {t['mean_materialize_s']} s, "
            f"score {t['mean_score_s']} s).",
            "",
        ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
