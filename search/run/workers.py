"""Ray workers: an actor pool that materialises candidates in place and scores them.

Weights travel once. The driver puts every weight set it needs (parents, accepted offspring)
into the Ray object store as a `SharedState` of numpy arrays in the weights' own dtype (a
bfloat16 checkpoint's parents at their own size); actors on the same node read them zero-copy
(the arrays are views of shared memory, never written). Each actor keeps ONE
working model and, per candidate, overwrites its parameters in place with the candidate's
tensors, one tensor at a time: no reload, no disk round trip, no second model in memory (a
compression plan is applied to a copy sharing the working model's weights, so it holds only
what the plan makes new).

An actor that dies (OOM, segfault, a lost node) is replaced by a fresh one and its candidate
is retried, up to `max_retries`; an exception inside scoring is a failed candidate with its
reason (failure is data, as in Optuna), not a crashed run. A candidate whose weights are not
finite gets the worst fitness and the status `nonfinite`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evolve.materialize import materialize

from search.models.memory import resident_memory
from search.run import faults
from search.run.candidate import EXAMPLE_KEYS, Candidate



@dataclass(frozen=True)
class SharedState:
    """A weight set as the object store holds it: numpy arrays, which Ray hands to every process
    on the node as zero-copy views of shared memory, in the weights' own dtype. numpy has no
    bfloat16, so those tensors travel as their raw 16-bit patterns (an int16 view, named in
    `bfloat16`) and are viewed back on the way out: a bfloat16 checkpoint's parents take their
    own size in the store, not twice it as float32."""

    arrays: dict[str, np.ndarray]
    bfloat16: frozenset[str] = frozenset()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def to_numpy_state(state: dict[str, torch.Tensor]) -> SharedState:
    arrays, bfloat16 = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
            bfloat16.add(name)
        arrays[name] = tensor.numpy()
    return SharedState(arrays, frozenset(bfloat16))


def from_numpy_state(state: SharedState) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # object-store arrays are read-only views; we only read them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {name: torch.from_numpy(array) for name, array in state.arrays.items()}
    return {name: t.view(torch.bfloat16) if name in state.bfloat16 else t for name, t in tensors.items()}


@dataclass
class WorkerSpec:
    """Everything an actor needs to build its working model and tasks."""

    template_dir: str  # a parent directory: architecture, tokenizer, tensor names
    tasks: list[dict]  # [{name, kind, dev, test, options}]
    names: list[str]  # tensor names that recipes produce
    exclude: list[str] = field(default_factory=list)
    dtype: str = "auto"
    threads: int = 1
    calibration: dict = field(default_factory=dict)  # CalibrationConfig fields: data, seq_len, num_sequences
    latency: dict | None = None  # {batch_size, seq_len, repeats, warmup}: time each candidate too
    proxy: dict | None = None  # staged fitness: the first stage's task ({kind, data, options}), named PROXY
    shared_recipes: bool = False  # candidates share recipes (evolver.share_recipe): cache per-recipe statistics
    recipe_stats_bytes: int | None = None  # whole width statistics kept per recipe at most (default: the model's size)
    rebuilt_dir: str | None = None  # where a planned candidate's rebuilt model waits for its test split (`keep_rebuilt`)
    rebuilt_host: str | None = None  # ... on this host, the driver's: actors elsewhere neither write nor read there


def all_finite(tensors) -> bool:
    """Whether every entry is finite, from one fp32 sum per tensor: a NaN or an infinity
    anywhere makes the sum NaN or infinite, and finite weights could only overflow it beyond
    3.4e38, which no usable model reaches. A reduction allocates nothing, where
    `isfinite(t).all()` writes a mask as large as the model: 0.2 s against 2.5 s for
    SmolLM2-135M, paid by every candidate (a cheap first stage costs about 3 s)."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)


@contextlib.contextmanager
def linear_weights_as(model: torch.nn.Module, dtype: torch.dtype):
    """For the duration, `model`'s linear layers hold `dtype` copies of their parameters (the
    originals are kept and put back, untouched).

    Autocast casts a linear layer's float32 weight to bfloat16 at every call, and under inference
    mode it caches none of these casts: every forward, each decode step included, then pays a
    cast of every weight (for a 1-token step of a 135M model on one core, more than the step
    itself: benchmarks/bench_screen_cost.py measures a whole first stage). Casting them once
    gives autocast the same bfloat16 operands, so the results are the same. Only linear layers:
    embeddings and norms run in float32 under autocast and keep their weights. A parameter a
    linear layer shares with another module (a tied embedding and output head: a fifth of
    SmolLM2-135M) is untied for the duration: the linear layer gets its own cast copy, the other
    module keeps the float32 original, so the residual stream stays float32 as plain autocast
    has it and the head is cast once rather than at every forward."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    shared_with_other = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear):
                owners.setdefault(id(param), []).append((module, name))
            else:
                shared_with_other.add(id(param))
    params = {id(p): p for p in model.parameters()}
    castable = [key for key in owners if params[key].is_floating_point() and params[key].dtype != dtype]
    kept = [(params[key], params[key].data) for key in castable if key not in shared_with_other]
    untied = [(module, name, params[key]) for key in castable if key in shared_with_other for module, name in owners[key]]
    try:
        for param, data in kept:
            param.data = data.to(dtype)
        copies = {}
        for module, name, param in untied:
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.data.to(dtype), requires_grad=False)
            module._parameters[name] = copies[id(param)]
        yield
    finally:
        for module, name, param in untied:
            module._parameters[name] = param
        for param, data in kept:
            param.data = data


def memory_after_job() -> dict[str, float] | None:
    """GiB an actor holds after a job: resident, its private heap (with what glibc keeps of the
    freed heap for the next job, which is cheaper than handing it back: see
    `search.models.memory`), and the most it has ever held. The peak only grows: the job that
    raised it is the one that set it, so the journal tells which candidates, stages and
    precisions an actor's memory must be sized for."""
    memory = resident_memory()
    return None if memory is None else {f"{k}_gib": round(v / 2**30, 3) for k, v in memory.items()}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def rebuilt_name(candidate: Candidate) -> str:
    """A kept rebuilt model's directory name: the candidate's id and a digest of its plan. Not of
    its recipe: a member's test split reads its stored weights (a `copy` recipe) where its dev
    scoring replayed the recipe that made them, the same weights."""
    plan = json.dumps(candidate.plan, sort_keys=True)
    return f"{candidate.id}-{hashlib.sha256(plan.encode()).hexdigest()[:12]}"


PROXY = "_proxy"  # the task name of a staged run's proxy first stage


@dataclass(frozen=True)
class ScoreJob:
    """One candidate to score on one split; `indices` (task -> item indices) picks the items of a
    staged-fitness subset, `subsample` a seeded random subset; `per_example` returns per-item
    scores too."""

    candidate: Candidate
    split: str = "dev"
    stage: int | None = None  # staged fitness: the stage this job scores (journalled with it)
    tasks: tuple[str, ...] | None = None  # the tasks to score (default: the run's tasks, not the proxy)
    indices: dict | None = None
    subsample: float | None = None
    subsample_seed: int = 0
    per_example: bool = False
    # Screening precision (`fitness.screen_dtype`): `autocast` scores this job's items with the
    # matrix products in that dtype; `screen_indices` (task -> item indices) asks the job to score
    # those items in `screen_dtype` too, apart (metrics[task]["screen_examples"]): the screening
    # items a candidate scored in full is later compared on as a member.
    autocast: str | None = None
    screen_dtype: str | None = None
    screen_indices: dict | None = None
    # Nested stages: the job scores only the items its stage adds to the candidate's journalled
    # stage `extends` (same items below, same precision); the driver joins the two
    # (`Evaluation.joined`), so no item is scored twice for one candidate.
    extends: int | None = None
    # A candidate that may be reported: after this job, its rebuilt model (plan applied with its
    # reconstruction), if it has a plan, is written under `WorkerSpec.rebuilt_dir`, and its test
    # split's job loads it there instead of rebuilding it.
    keep_rebuilt: bool = False

    @property
    def id(self) -> str:
        return self.candidate.id


class Evaluator:
    """One working model; `evaluate(job, refs)` scores one candidate (run as a Ray actor)."""

    def __init__(self, spec: WorkerSpec):
        from transformers.utils import logging as hf_logging

        from search.fitness import TaskSpec, build_task
        from search.models.sources import load_model

        hf_logging.disable_progress_bar()
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model, self.tokenizer = load_model(spec.template_dir, dtype=self.dtype, device=self.device)
        state = self.model.state_dict(keep_vars=True)
        self.params = {name: state[name].data for name in spec.names}
        self._task_specs = {t["name"]: t for t in spec.tasks}
        self._run_tasks = tuple(self._task_specs)
        if spec.proxy is not None:
            self._task_specs[PROXY] = {**spec.proxy, "name": PROXY, "dev": spec.proxy["data"], "test": spec.proxy["data"]}
        self._tasks: dict[tuple[str, str], Any] = {}
        self._build_task = lambda t, split: build_task(
            TaskSpec(kind=t["kind"], data=t[split], name=t["name"], options=t.get("options") or {}), self.tokenizer
        )
        self._calibration = None
        self._weights_key: str | None = None  # what the working model holds: its recipe's fingerprint
        self._references: dict[tuple[str, str], Any] = {}  # (weights key, task:split:precision) -> KL reference
        self._width_stats: dict[tuple, dict] = {}  # (weights key, plan windows?, step fields) -> a recipe's width statistics
        self._planned: tuple | None = None  # (candidate key, its compressed model): kept for its next stage
        self._plans_share_weights = True  # plans start from a copy sharing the working weights (see _apply_plan)

    def task(self, name: str, split: str):
        key = (name, split)
        if key not in self._tasks:  # tokenised once per worker, on first use
            self._tasks[key] = self._build_task(self._task_specs[name], split)
        return self._tasks[key]

    def task_sizes(self, split: str) -> dict[str, int]:
        """Items per task that a full evaluation scores (after the task's own `subsample`
        option): staged subsets index into these."""
        return {name: len(self.task(name, split).selected(None, 0)) for name in self._task_specs}

    def info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device), "dtype": str(self.dtype)}

    def evaluate(self, job: ScoreJob, refs: dict) -> dict:
        start = time.perf_counter()
        candidate = job.candidate
        faults.crash_once(candidate.id)
        reconstruct = not (job.tasks == (PROXY,) and self.spec.proxy.get("unreconstructed"))
        key = (candidate.id, candidate.recipe.fingerprint(), json.dumps(candidate.plan, sort_keys=True), reconstruct)
        kept = self._read_rebuilt(candidate, job) if job.split == "test" and reconstruct else None
        if kept is not None:
            model = kept  # built for its dev scoring: the working model stays as it is
        elif self._planned is not None and self._planned[0] == key:
            model = self._planned[1]  # the next stage of the candidate this actor just scored
        else:
            self._planned = None  # free the previous candidate's compressed model first (it shares these weights)
            self._hold_recipe(candidate, refs)
            if faults.poison_weights(candidate.id, self.params):
                self._weights_key = f"{self._weights_key}:poisoned:{candidate.id}"  # never reused
            model = self._apply_plan(candidate, refs, reconstruct) if candidate.plan else self.model
            if candidate.plan:
                self._planned = (key, model)
        materialized = time.perf_counter()
        result = {"id": candidate.id, "split": job.split, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        screen_s = None  # part of the scoring: screening items scored apart for later comparisons
        if not all_finite(model.parameters()):
            result.update(status="nonfinite", metrics={}, reason="non-finite weights")
        else:
            with self._autocast(job.autocast, model):
                references = self._kl_references(candidate, job, job.autocast)  # from the dense working model
                metrics = {name: self._score(name, model, job, references.get(name)) for name in job.tasks or self._run_tasks}
            if job.screen_indices:
                screen_start = time.perf_counter()
                self._screen(model, job, metrics)
                screen_s = round(time.perf_counter() - screen_start, 4)
            result.update(status="ok", metrics=metrics, num_params=sum(p.numel() for p in model.parameters()))
            if self._autocast_dtype(job.autocast) is not None:
                result["autocast"] = job.autocast
            if self.spec.latency:
                from search.run.latency import forward_latency_ms

                result["latency_ms"] = round(forward_latency_ms(model, **self.spec.latency), 4)
        scored = time.perf_counter()
        result["timing"] = {"materialize_s": round(materialized - start, 4), "score_s": round(scored - materialized, 4)}
        if screen_s is not None:
            result["timing"]["screen_s"] = screen_s
        if job.keep_rebuilt and candidate.plan and reconstruct and result["status"] == "ok" and self._write_rebuilt(candidate, model):
            result["timing"]["keep_s"] = round(time.perf_counter() - scored, 4)
        if kept is not None:  # the making was reading the model the candidate's dev scoring built
            result["timing"]["rebuilt_read_s"] = result["timing"]["materialize_s"]
        memory = memory_after_job()
        if memory:
            result["memory"] = memory
        return result

    def _rebuilt_path(self, candidate: Candidate) -> Path | None:
        """Where `candidate`'s rebuilt model is kept (`rebuilt_name`), on the driver's host."""
        if not self.spec.rebuilt_dir or not candidate.plan or socket.gethostname() != self.spec.rebuilt_host:
            return None
        return Path(self.spec.rebuilt_dir) / rebuilt_name(candidate)

    def _write_rebuilt(self, candidate: Candidate, model) -> bool:
        """Write the candidate's rebuilt model (`compression.loader` format) for its test split,
        into a temporary directory renamed when complete: a reader finds a whole model or none.
        False when there is nowhere to keep it or it is kept already."""
        from compression.loader import save_compressed

        final = self._rebuilt_path(candidate)
        if final is None or final.is_dir():
            return False
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            save_compressed(model, None, partial)
            os.replace(partial, final)
        except OSError as exc:  # a full disk costs the rebuild later, not the run
            shutil.rmtree(partial, ignore_errors=True)
            warnings.warn(f"{candidate.id}: could not keep the rebuilt model ({exc}); its test split rebuilds it")
            return False
        return True

    def _read_rebuilt(self, candidate: Candidate, job: ScoreJob):
        """The candidate's kept rebuilt model, loaded beside the working model (as a plan's new
        tensors are held beside it), or None where there is none or it does not load, or where
        a `kl` task needs the candidate's dense weights in the working model as its reference."""
        from compression.loader import StructureError, load_compressed

        path = self._rebuilt_path(candidate)
        if path is None or not path.is_dir():
            return None
        if any(self._task_specs[name]["kind"] == "kl" for name in job.tasks or self._run_tasks):
            return None
        try:
            return load_compressed(path, dtype=self.dtype).to(self.device)
        except (StructureError, OSError, RuntimeError) as exc:
            warnings.warn(f"{candidate.id}: the kept rebuilt model does not load ({exc}); rebuilding it")
            return None

    def _hold_recipe(self, candidate: Candidate, refs: dict) -> None:
        """Make the working model hold the candidate's recipe, unless it already does (a sibling
        sharing the recipe finds it made)."""
        import ray

        fingerprint = candidate.recipe.fingerprint()
        if self._weights_key != fingerprint:
            weights = {wid: from_numpy_state(ray.get(ref)) for wid, ref in refs.items()}
            materialize(candidate.recipe, weights, self.spec.names, self.spec.exclude, out=self.params)
            del weights
            self._weights_key = fingerprint

    def _autocast_dtype(self, dtype: str | None) -> torch.dtype | None:
        """The dtype a job's autocast runs in, or None when it is the working model's own (the
        GPU's default bfloat16 screens at no extra cost) or not asked for."""
        wanted = getattr(torch, dtype) if dtype else None
        return None if wanted in (None, self.dtype) else wanted

    def _autocast(self, dtype: str | None, model) -> contextlib.ExitStack:
        """Autocast to `dtype` with `model`'s linear weights cast once for the duration."""
        stack = contextlib.ExitStack()
        wanted = self._autocast_dtype(dtype)
        if wanted is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=wanted))
            stack.enter_context(linear_weights_as(model, wanted))
        return stack

    def _screen(self, model, job: ScoreJob, metrics: dict) -> None:
        """Score the job's screening items in the screening dtype, apart, into each task's
        metrics as `screen_examples`; when that dtype is the model's own they are a filter of
        the job's own per-example scores."""
        if self._autocast_dtype(job.screen_dtype) is None:
            for name, items in job.screen_indices.items():
                pool = self.task(name, job.split).selected(None, 0)
                wanted = {pool[i] for i in items}  # examples carry the task's own item ids
                examples = metrics[name]["examples"]
                keep = [k for k, i in enumerate(examples["index"]) if i in wanted]
                metrics[name]["screen_examples"] = {key: [examples[key][k] for k in keep] for key in EXAMPLE_KEYS}
            return
        with self._autocast(job.screen_dtype, model):  # the weights cast once for every task
            for name, items in job.screen_indices.items():
                screen_job = replace(job, tasks=(name,), indices={name: items}, per_example=True, screen_indices=None)
                reference = self._kl_references(job.candidate, screen_job, job.screen_dtype).get(name)
                metrics[name]["screen_examples"] = self._score(name, model, screen_job, reference)["examples"]

    def _score(self, name: str, model, job: ScoreJob, reference) -> dict:
        task = self.task(name, job.split)
        kwargs = {"reference": reference} if task.kind == "kl" else {}
        if job.indices is not None and name in job.indices:
            pool = task.selected(None, 0)  # the items a full evaluation scores
            return task.evaluate(model, indices=[pool[i] for i in job.indices[name]], per_example=job.per_example, **kwargs)
        return task.evaluate(model, subsample=job.subsample, seed=job.subsample_seed, per_example=job.per_example, **kwargs)

    def _kl_references(self, candidate: Candidate, job: ScoreJob, autocast: str | None = None) -> dict:
        """KL tasks compare a compressed candidate with its own dense weights (still in the
        working model before the plan): the reference log-probs, cached per recipe and
        precision (a screening stage's are computed in its dtype, as the candidate's). A
        candidate without a plan is its own reference (KL 0)."""
        fingerprint, split = self._weights_key, job.split
        precision = self._autocast_dtype(autocast)
        references = {}
        for name in job.tasks or self._run_tasks:
            if self._task_specs[name]["kind"] != "kl":
                continue
            key = (fingerprint, f"{name}:{split}:{precision}")
            if key not in self._references:
                self._references = {k: v for k, v in self._references.items() if k[0] == fingerprint}
                self._references[key] = self.task(name, split).reference(self.model)
            references[name] = self._references[key]
        return references

    def _apply_plan(self, candidate: Candidate, refs: dict, reconstruct: bool = True):
        """Apply a plan to a copy of the working model that shares its weights
        (`copy_sharing_weights`): the working model keeps its shape and its dense weights, for
        the KL references and the siblings of its recipe, and the actor holds one model plus what
        the plan makes new, not two models. Should an op write into the shared weights after
        all (an op registered outside evofuse may), the working model is made again from its
        recipe and this plan and every later one get a copy of their own (a deep copy).

        Without `reconstruct` (`proxy.unreconstructed`, the KL stage) width steps choose their
        units by their criterion and reconstruct nothing. With shared recipes, the statistics
        that choice reads come from the proxy's own windows (a `kl` proxy's; another kind of proxy
        reads the plan's calibration): the KL stage then costs a recipe
        one forward pass over the proxy's tokens (8 x 128 in the joint demo) instead of one over
        the plan's calibration (32 x 128), a quarter of the recipe's work before any plan. (Every
        other step, block importance included, reads the plan's calibration as always.) A
        candidate that goes on is rebuilt from the plan's calibration with its reconstruction.

        When candidates share recipes (`evolver.share_recipe`), a plan that starts by pruning
        width takes its statistics from a cache kept for the recipe: gathered once for every
        layer the step's target reaches, they serve every plan over the same weights
        (bit-identical to the step's own pass: the same batches, and each projection's
        statistics are its own), so the candidates of a recipe pay one calibration pass. See
        `_recipe_width_stats` for what the cache keeps."""
        from compression.plan import copy_sharing_weights, weight_versions

        steps = list(candidate.steps) if reconstruct else [without_reconstruction(step) for step in candidate.steps]
        if self._plans_share_weights:
            versions = weight_versions(self.model)
            model = self._planned_from(copy_sharing_weights(self.model), steps, reconstruct)
            if weight_versions(self.model) == versions:
                return model
            del model
            warnings.warn(f"{candidate.id}: a plan step wrote into the working model's weights; plans get a copy of their own from now on")
            self._plans_share_weights = False
            self._weights_key, self._references, self._width_stats = None, {}, {}  # nothing made from them holds
            self._hold_recipe(candidate, refs)
        return self._planned_from(copy.deepcopy(self.model), steps, reconstruct)

    def _planned_from(self, model, steps: list, reconstruct: bool):
        from compression.plan import apply_plan
        from compression.width import apply_plan_from_stats, needs_stats

        if self.spec.shared_recipes and steps and steps[0].op == "prune_width" and needs_stats(steps[0]):
            first = steps[0] if reconstruct else steps[0].model_copy(update={"samples": None})  # every proxy window
            stats = self._recipe_width_stats(first, self.calibration() if reconstruct else self.proxy_windows())
            if stats is not None:
                return apply_plan_from_stats(model, steps, stats, self.calibration()).eval()
        return apply_plan(model, steps, self.calibration()).eval()

    def calibration(self):
        from search.models.datasets import calibration_windows

        if self._calibration is None:
            c = self.spec.calibration
            self._calibration = calibration_windows(self.tokenizer, c["data"], c["seq_len"], c["num_sequences"])
        return self._calibration

    def proxy_windows(self):
        """The proxy task's own token windows (a `kl` proxy's), else the plan's calibration."""
        from compression.calibration import CalibrationData

        windows = getattr(self.task(PROXY, "dev"), "windows", None)
        return CalibrationData(windows) if windows is not None else self.calibration()

    def _recipe_width_stats(self, step, windows) -> dict | None:
        """Every targeted layer's input statistics on the working model over `windows` (see
        `_apply_plan`), or None where the step had better gather its own.

        What is kept scales with the model only as far as the step needs:
        - a step that reconstructs nothing and ranks by `wanda` or `second_moment` (the KL
          stage's unreconstructed width steps) reads only each unit's diagonal block of the Gram
          matrices: those are kept (`collect_unit_grams`; 137 MB for the Llama-2-7B shape);
        - a step that reconstructs reads whole matrices (hidden² + intermediate² float64 per
          layer: 35 GB for that shape). They are kept only while within `recipe_stats_bytes`
          (`workers.recipe_stats_gib`; default: no larger than the working model's own weights);
          beyond that the step gathers its own block by block (`prune_width`: one block's
          matrices alive), a pass per plan rather than per recipe."""
        from compression.width import collect_unit_grams, collect_width_stats, unit_blocks_suffice, width_stats_bytes

        units = unit_blocks_suffice(step)
        key = (self._weights_key, windows is self._calibration, units, step.target, step.samples, step.batch_size)
        if key not in self._width_stats:
            budget = self.spec.recipe_stats_bytes
            if budget is None:
                budget = sum(p.numel() * p.element_size() for p in self.model.parameters())
            if not units and width_stats_bytes(self.model, step.target) > budget:
                return None
            # Free another recipe's statistics before gathering these.
            self._width_stats = {k: v for k, v in self._width_stats.items() if k[0] == self._weights_key}
            if units:
                self._width_stats[key] = collect_unit_grams(self.model, step, windows)
            else:
                self._width_stats[key] = collect_width_stats(self.model, step, windows, every_layer=True)
        return self._width_stats[key]


def without_reconstruction(step):
    """A width step choosing the same number of units by its criterion, reconstructing nothing."""
    if step.op == "prune_width" and step.reconstruct != "none":
        return step.model_copy(update={"reconstruct": "none"})
    return step


def init_ray(address: str | None, num_cpus: int | None = None, quiet: bool = True) -> None:
    import logging

    import ray

    if ray.is_initialized():
        return
    env = faults.worker_env()
    kwargs: dict = dict(
        include_dashboard=False,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
        runtime_env={"env_vars": env} if env else None,
    )
    # Ray's own convention (`ray job submit` sets it for its entrypoint): RAY_ADDRESS names the
    # cluster when neither --address nor workers.address does.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
        return
    # A local Ray dies with its driver: Ray's own fate-sharing ends the raylet and GCS, but its
    # DashboardAgent and RuntimeEnvAgent hang on after a SIGKILLed driver. A watchdog process
    # (Linux: it reads /proc) notes every process this ray.init starts and their descendants
    # (nothing else the driver runs), and when the driver is gone (its pipe closes, however
    # the driver ended) kills those still alive.
    import subprocess
    import sys

    watchdog = getattr(init_ray, "watchdog", None)
    if watchdog is not None:  # an earlier local Ray of this process: its watchdog finishes first
        watchdog.stdin.close()
        watchdog.wait()
    watchdog = None
    if os.path.isdir("/proc/self"):
        watchdog = subprocess.Popen([sys.executable, "-c", _RAY_WATCHDOG, str(os.getpid())], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        watchdog.stdout.readline()  # it has seen what ran before Ray
        init_ray.watchdog = watchdog  # its pipe must stay open as long as this process lives
    try:
        # Ray starts its workers at niceness 15; here the actors do all the scoring while the
        # driver waits, so on a shared machine a niced pool would starve behind anything else.
        ray.init(num_cpus=num_cpus, _system_config={"worker_niceness": 0}, **kwargs)
    except BaseException:
        if watchdog is not None:
            watchdog.stdin.close()  # clean up what a failed start left
        raise
    if watchdog is not None:
        watchdog.stdin.write(b"started\n")  # the driver's new children are Ray's: watch them only
        watchdog.stdin.flush()


_RAY_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
driver, me = int(sys.argv[1]), os.getpid()

def stat(pid):  # (ppid, start time) from /proc/PID/stat
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]

def children():  # {ppid: [(pid, start time)]}
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid, start = stat(name)
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(ppid, []).append((int(name), start))
    return found

def below(roots):  # {pid: start time} of the roots and all their descendants
    kids, found, todo = children(), dict(roots), [pid for pid, _ in roots]
    while todo:
        for pid, start in kids.get(todo.pop(), []):
            if pid != me and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found

before = set(children().get(driver, []))
sys.stdout.write("ready\n")
sys.stdout.flush()
roots, seen = None, {}
while True:
    readable, _, _ = select.select([sys.stdin], [], [], 1.0)
    data = os.read(sys.stdin.fileno(), 65536) if readable else None
    if data is not None and roots is None:  # ray.init returned (or failed): what it started
        roots = [(p, s) for p, s in children().get(driver, []) if (p, s) not in before and p != me]
    if roots is not None:
        seen.update(below(roots))
    if data == b"":
        break
time.sleep(1.0)  # Ray's own fate-sharing first
for pid, start in seen.items():
    try:
        if stat(pid)[1] == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""


def put_weights(state: dict[str, torch.Tensor]):
    import ray

    return ray.put(to_numpy_state(state))


@dataclass(frozen=True)
class Next:
    """What a result lets run next. `follow`, the candidate's next stage, goes to the actor that
    just scored it, at once (it still holds the candidate's compressed model); `released` jobs
    (a family's next stage once its last sibling is in, its audits) join the end of the queue,
    for whichever actor is free. Each is (job, refs)."""

    follow: tuple | None = None
    released: tuple = ()


class EvaluatorPool:
    """A fixed number of Evaluator actors fed from a queue; results come back as they finish.

    Spare work (`add_spare`) fills the actors that would otherwise wait: an actor takes a spare
    job only when the queue is empty while other actors score jobs that release no more (the
    end of a generation, where one full evaluation runs alone), and a spare job in flight runs
    on across `run` calls, through the driver's work between generations, until it finishes or
    `drain` waits for it."""

    def __init__(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float, max_retries: int,
                 actor_class: type | None = None):
        import ray

        gpus = num_gpus if num_gpus > 0 and _cluster_has_gpus() else 0
        # `actor_class(spec)` with `evaluate(job, refs)`: the Evaluator (another for the pool's own tests)
        self._actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=gpus, max_restarts=0)(actor_class or Evaluator)
        self.spec = spec
        self.max_retries = max_retries
        self.actors = [self._actor_cls.remote(spec) for _ in range(count)]
        self.replaced = 0
        self.spare: deque = deque()  # (job, refs, attempt, on_done) not started
        self.spare_running: dict = {}  # future -> (actor index, job, refs, attempt, on_done)
        self.recipe_of: dict[int, str] = {}  # actor index -> the recipe its working model last held

    def add_spare(self, jobs: list[tuple[ScoreJob, dict]], on_done: Callable[[ScoreJob, dict], None]) -> None:
        """Queue spare work; `on_done(job, result)` is called when a job finishes, whenever that is."""
        self.spare.extend((job, refs, 0, on_done) for job, refs in jobs)

    def spare_in_flight(self) -> set[tuple]:
        """(id, split, stage) of the spare jobs running now."""
        return {(job.id, job.split, job.stage) for _, job, *_ in self.spare_running.values()}

    def drop_spare(self) -> None:
        """Forget the spare jobs not started."""
        self.spare.clear()

    def drain(self) -> None:
        """Wait for the spare jobs in flight (their `on_done` called) and drop those not started."""
        import ray

        self.drop_spare()
        while self.spare_running:
            done, _ = ray.wait(list(self.spare_running), num_returns=1)
            self._spare_finished(done[0])

    def run(self, jobs: list[tuple[ScoreJob, dict]], on_result: Callable[[dict], Next | None],
            may_release: Callable[[ScoreJob], bool] = lambda job: False) -> None:
        """Score every (job, refs); call on_result for each result the moment it arrives, and
        run what it returns (`Next`). `may_release(job)`: whether the job's result can release
        more work; while such a job runs, an idle actor waits for it rather than take spare work
        (a family's last first-stage job releases its full evaluation and audits at once)."""
        import ray

        queue = deque((job, refs, 0) for job, refs in jobs)
        running: dict = {}  # future -> (actor index, job, refs, attempt)
        busy = {index for index, *_ in self.spare_running.values()}
        idle = [i for i in range(len(self.actors)) if i not in busy]
        while queue or running:
            while queue and idle:
                index = idle.pop()
                job, refs, attempt = take_for(queue, self.recipe_of.get(index), set(self.recipe_of.values()))
                running[self._start(index, job, refs)] = (index, job, refs, attempt)
            spare_now = running and not any(may_release(job) for _, job, _, _ in running.values())
            while idle and self.spare and spare_now:  # an actor that would wait for the last jobs
                index = idle.pop()
                job, refs, attempt, on_done = self.spare.popleft()
                self.spare_running[self._start(index, job, refs)] = (index, job, refs, attempt, on_done)
            done, _ = ray.wait(list(running) + list(self.spare_running), num_returns=1)
            future = done[0]
            if future in self.spare_running:
                idle.append(self._spare_finished(future))
                continue
            index, job, refs, attempt = running.pop(future)
            result = self._result(future, index, job, attempt)
            if result is None:  # its actor died and was replaced: the job goes again
                queue.appendleft((job, refs, attempt + 1))
                idle.append(index)
                continue
            after = on_result(result) or Next()
            queue.extend((job, refs, 0) for job, refs in after.released)
            if after.follow is not None:
                running[self._start(index, *after.follow)] = (index, *after.follow, 0)
            else:
                idle.append(index)

    def _start(self, index: int, job: ScoreJob, refs: dict):
        self.recipe_of[index] = job.candidate.recipe.fingerprint()
        return self.actors[index].evaluate.remote(job, refs)

    def _result(self, future, index: int, job: ScoreJob, attempt: int) -> dict | None:
        """A finished job's result (a failure is a result, with its reason); None when its actor
        died and the job may go again (the actor is replaced by a fresh one either way)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            result = ray.get(future)
            result["attempts"] = attempt + 1
            return result
        except RayActorError as exc:
            self.actors[index] = self._actor_cls.remote(self.spec)
            self.recipe_of.pop(index, None)
            self.replaced += 1
            if attempt < self.max_retries:
                return None
            return _failed(job, f"worker died {attempt + 1} times: {type(exc).__name__}", attempt + 1)
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return _failed(job, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}", attempt + 1)

    def _spare_finished(self, future) -> int:
        """Hand a finished spare job's result to its `on_done` (or queue it again); its actor's index."""
        index, job, refs, attempt, on_done = self.spare_running.pop(future)
        result = self._result(future, index, job, attempt)
        if result is None:
            self.spare.appendleft((job, refs, attempt + 1, on_done))
        else:
            on_done(job, result)
        return index

    def task_sizes(self, split: str = "dev") -> dict[str, int]:
        """Items per task, asked of one actor (they all build the same tasks)."""
        import ray

        return ray.get(self.actors[0].task_sizes.remote(split))

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def take_for(queue: deque, held: str | None, elsewhere: set[str]):
    """The queued (job, refs, attempt) an idle actor takes: the first of the recipe it already
    holds (its KL reference and statistics are cached), else the first of a recipe no actor
    holds (so actors spread over recipes instead of each paying for the same), else the first."""
    recipes = [job.candidate.recipe.fingerprint() for job, _, _ in queue]
    at = next((i for i, r in enumerate(recipes) if r == held), None)
    if at is None:
        at = next((i for i, r in enumerate(recipes) if r not in elsewhere), 0)
    chosen = queue[at]
    del queue[at]
    return chosen


def _failed(job: ScoreJob, reason: str, attempts: int) -> dict:
    return {"id": job.id, "split": job.split, "status": "failed", "metrics": {}, "reason": reason, "attempts": attempts}


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
