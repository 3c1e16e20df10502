"""The search driver: one process that owns the population, the journal and the checkpoints.

Flow of a run (see DESIGN.md): resolve parents (fine-tuning experts once, cached) and check
they share every tensor; start Ray and an actor pool; put parent weights in the object store;
score the parents (generation "init"); then for each generation ask the DEAP toolbox for one
Evolver offspring per member, score them on the dev sets, apply one-to-one greedy selection,
and checkpoint. At the end, score the parents and the best candidates on the test splits
(reported, never used to select) and export the best.

`compress` and `joint` runs (two objectives: dev score up, parameters down) differ in two
places: each candidate also carries a plan asked from the Optuna study (told back with its
result, FAIL with the reason when it fails), and survivors are chosen by NSGA-II over members
and candidates; the hall of fame is then the Pareto front of every candidate scored. With a
size budget, the first generation's plans are anchors sized to it (search/space.py), and a plan
whose parameter count (predicted from shapes, before any work) is over it is told PRUNED and
asked again, so every evaluation goes to a candidate that selection can keep.

Resume: every finished evaluation is in the journal before anything else happens; offspring
ids and recipes are a pure function of (seed, generation, population), and the trials asked for
a generation are checkpointed before it is scored, so a resumed run re-derives the same
candidates, takes the finished ones from the journal and scores only the rest. The population
changes only in the checkpoint written at the end of a generation.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from compression.arch import num_blocks
from compression.plan import PlanError, check_plan, parse_plan, predict_num_params
from evolve.operators import materialize
from evolve.population import (
    WORST,
    finite_or_worst,
    generation_record,
    hall_of_fame_from,
    make_member,
    make_toolbox,
    member_from_json,
    member_score,
    member_to_json,
    pareto_front_of,
    select_pareto,
)
from evolve.recipe import Recipe

from search.config import ConfigError, RunConfig, dump_config, load_config, population_merge_recipe, seed_recipe
from search.models.experts import resolve_parents
from search.fitness.core import aggregate
from search.models.sources import load_state, tensor_index
from search.tuning.space import budget_anchors, suggest_plan
from search.tuning.study import prune_over_budget, tell_result
from search.run.store import RunStore
from search.run.workers import EvaluatorPool, WorkerSpec, from_numpy_state, init_ray, put_weights

HALL_OF_FAME_SIZE = 10  # best members ever seen; their weights stay in the run for export
FAILED_PARAMS = 2**62  # parameter count recorded for a failed candidate (JSON has no infinity)
FAILED_LATENCY_MS = 1e12  # and its latency, when latency is an objective
MAX_PLAN_ASKS = 100  # plans asked per candidate before one over the size budget is scored anyway
STALL_ENV = "EVOFUSE_FAULT_STALL"  # "<candidate id>": hang right after journalling it (kill tests)


def _maybe_stall(candidate_id: str) -> None:
    if os.environ.get(STALL_ENV) == candidate_id:
        time.sleep(3600)


def default_run_dir(config: RunConfig) -> Path:
    return Path(config.run_dir) if config.run_dir else Path("runs") / config.name


def check_parent_tensors(dirs: dict[str, Path]) -> list[str]:
    """All parents must share tensor names and shapes; return the names, or say which differs."""
    (base_name, base_dir), *others = dirs.items()
    reference = tensor_index(base_dir)
    for name, path in others:
        index = tensor_index(path)
        for tensor in sorted(set(reference) | set(index)):
            if tensor not in index:
                raise ConfigError(f"parents.{name}: tensor {tensor} is missing (present in {base_name})")
            if tensor not in reference:
                raise ConfigError(f"parents.{name}: tensor {tensor} is not in {base_name}")
            if index[tensor][0] != reference[tensor][0]:
                raise ConfigError(
                    f"parents.{name}: tensor {tensor} has shape {list(index[tensor][0])}, "
                    f"{base_name} has {list(reference[tensor][0])}"
                )
    return sorted(reference)


def task_scores(metrics: dict) -> dict[str, float]:
    return {task: m["score"] for task, m in metrics.items()}


def result_score(result: dict, weights: dict[str, float]) -> float:
    if result.get("status") != "ok":
        return WORST
    return finite_or_worst(aggregate(task_scores(result["metrics"]), weights))


class Log:
    """Progress bars and log lines on stderr that do not break each other."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=self.quiet, file=sys.stderr, leave=False)


@dataclass
class Search:
    config: RunConfig
    store: RunStore
    address: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self.log = Log(self.quiet)
        self.weights = {t.name: t.weight for t in self.config.tasks}
        self.journal = {(e["id"], e["split"]): e for e in self.store.read_journal() if "split" in e}
        self.refs: dict = {}  # weight-set id -> object ref

    # ---- set-up --------------------------------------------------------------------------
    def start(self) -> None:
        self.parent_dirs = resolve_parents(self.config, quiet=self.quiet)
        self.names = check_parent_tensors(self.parent_dirs)
        workers = self.config.workers
        init_ray(self.address or workers.address, quiet=self.quiet)
        spec = WorkerSpec(
            template_dir=str(self.parent_dirs[self.config.parents.base.name]),
            tasks=[t.model_dump(mode="json") for t in self.config.tasks],
            names=self.names,
            exclude=list(self.config.evolver.exclude),
            dtype=workers.dtype,
            threads=max(1, int(workers.num_cpus)),
            calibration=self.config.compress.space.calibration.model_dump() if self.pareto else None,
            latency=self.config.compress.latency.model_dump() if self.pareto and self.config.compress.latency else None,
        )
        from transformers import AutoConfig

        self.base_config = AutoConfig.from_pretrained(spec.template_dir)
        self.num_layers = num_blocks(self.base_config)
        self.pool = EvaluatorPool(spec, workers.count, workers.num_cpus, workers.num_gpus, workers.max_retries)
        for name, path in self.parent_dirs.items():
            self.refs[name] = put_weights(load_state(path))

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, jobs: list[dict], desc: str) -> dict[str, dict]:
        """Results by id: from the journal when finished before, else scored now and journalled."""
        results = {j["id"]: self.journal[(j["id"], j["split"])] for j in jobs if (j["id"], j["split"]) in self.journal}
        todo = [j for j in jobs if j["id"] not in results]
        bar = self.log.bar(len(jobs), desc)
        bar.update(len(results))

        def on_result(result: dict) -> None:
            result["score"] = result_score(result, self.weights)
            job = next(j for j in todo if j["id"] == result["id"])
            result["recipe"], result["plan"] = job["recipe"], job["plan"]
            if "trial" in job:
                result["trial"] = job["trial"]
            result["time"] = round(time.time(), 3)
            self.store.append_journal(result)
            _maybe_stall(result["id"])
            self.journal[(result["id"], result["split"])] = result
            results[result["id"]] = result
            if result["status"] != "ok":
                self.log(f"{result['id']}: {result['status']} ({result.get('reason', '')}), worst fitness")
            elif result.get("attempts", 1) > 1:
                self.log(f"{result['id']}: scored after {result['attempts']} attempts (worker replaced)")
            bar.update(1)
            bar.set_postfix(best=f"{max(r['score'] for r in results.values()):.4f}")

        runnable = []
        for job in todo:
            reason = self.plan_error(job["plan"])
            if reason is None:
                runnable.append((job, {wid: self.refs[wid] for wid in Recipe.from_dict(job["recipe"]).input_ids()}))
            else:
                on_result({"id": job["id"], "split": job["split"], "status": "failed", "metrics": {}, "reason": reason, "attempts": 0})
        self.pool.run(runnable, on_result)
        bar.close()
        return results

    def job(
        self, cid: str, recipe: Recipe, split: str = "dev", generation: int | None = None, plan: list | None = None, trial: int | None = None
    ) -> dict:
        job = {"id": cid, "recipe": recipe.to_dict(), "split": split, "plan": plan or []}
        if trial is not None:
            job["trial"] = trial
        subsample = self.config.evolver.subsample
        if split == "dev" and subsample and generation is not None:
            job.update(subsample=subsample, subsample_seed=generation)
        return job

    def plan_error(self, plan: list) -> str | None:
        """Why a plan cannot apply to the base architecture (checked before any work), or None."""
        if not plan:
            return None
        try:
            check_plan(parse_plan(plan), self.base_config)
        except PlanError as exc:
            return f"PlanError: {exc}"
        return None

    # ---- the run -------------------------------------------------------------------------
    @property
    def pareto(self) -> bool:
        """compress / joint runs have two objectives (score up, parameters down)."""
        return self.config.mode != "merge"

    def run(self) -> dict:
        state = self.store.read_state()  # verified by _run before any worker started
        if state is None:
            state = self.initial_state()
        self.restore_population(state)
        evo = self.config.evolver
        toolbox = make_toolbox(self.config.seed, evo.generations, evo.F, evo.CR, evo.strategy, evo.reference)
        self.study = self.open_study() if self.pareto else None
        if self.study is not None and not self.study.trials:
            self.enqueue_budget_anchors()
        for generation in range(state["generation"], evo.generations):
            state = self.run_generation(toolbox, generation, state)
        return self.finish(state)

    @property
    def timed(self) -> bool:
        """Latency is a third objective (compress / joint runs with `compress.latency`)."""
        return self.pareto and self.config.compress.latency is not None

    def member(self, cid: str, recipe: Recipe, result: dict, plan: list | None = None):
        params = result.get("num_params") if self.pareto else None
        latency = result.get("latency_ms") if self.timed else None
        score = result["score"]
        if self.pareto and params is None:
            score, params = WORST, FAILED_PARAMS  # failed: dominated by everything
            latency = FAILED_LATENCY_MS if self.timed else None
        elif self.pareto and self.max_params is not None and params > self.max_params:
            score = WORST  # over budget: ranked below every feasible candidate
        return make_member(cid, recipe, score, task_scores(result.get("metrics", {})), plan, params, latency)

    def initial_state(self) -> dict:
        names = [p.name for p in self.config.parents.all()]
        recipes = {n: Recipe(op="copy", inputs=(n,)) for n in names}
        seeds = {seed.name: seed_recipe(self.config, seed) for seed in self.config.evolver.seeds}
        checksums = {name: self.keep_weights(recipe, name) for name, recipe in seeds.items()}
        recipes.update(seeds)
        results = self.evaluate([self.job(n, r) for n, r in recipes.items()], "parents")
        state = {
            "generation": 0,
            "status": "running",
            "parents": {
                n: {"score": results[n]["score"], "num_params": results[n].get("num_params"), "latency_ms": results[n].get("latency_ms")}
                for n in names
            },
            "dense_params": results[names[0]].get("num_params"),
            "weight_checksums": checksums,
            "evaluations": len(results),
            "fingerprint": self.config.fingerprint(),
            "started": time.time(),
        }
        self.max_params = self.resolve_budget(state)
        members = [self.member(n, recipes[n], results[n]) for n in self.population_names() + list(seeds)]
        state["population"] = [member_to_json(m) for m in members]
        state["hall_of_fame"] = [member_to_json(m) for m in self.best_of(members)]
        self.store.write_state(state)
        return state

    def population_names(self) -> list[str]:
        if self.config.mode == "compress":
            return [self.config.compress.weights or self.config.parents.base.name]
        names = [e.name for e in self.config.parents.experts]
        return ([self.config.parents.base.name] + names) if self.config.evolver.include_base else names

    def resolve_budget(self, state: dict) -> float | None:
        budget = self.config.compress.max_params
        if budget is None or not self.pareto:
            return None
        return budget * state["dense_params"] if budget <= 1 else budget

    def best_of(self, members) -> list:
        if self.pareto:
            return pareto_front_of(members)
        return list(hall_of_fame_from(members, HALL_OF_FAME_SIZE))

    def restore_population(self, state: dict) -> None:
        self.max_params = self.resolve_budget(state)
        self.population = [member_from_json(m) for m in state["population"]]
        for member_id, checksum in state["weight_checksums"].items():
            if member_id not in self.refs:
                self.refs[member_id] = put_weights(self.store.load_weights(member_id, checksum))

    # ---- one generation ------------------------------------------------------------------
    def children(self, toolbox, generation: int, state: dict) -> list[dict]:
        """This generation's candidates: {id, target, recipe, plan, trial} (persisted before scoring)."""
        pending = state.get("pending")
        if pending and pending["generation"] == generation:
            return pending["children"]  # asked before a kill: the same trials, not new ones
        if self.config.mode == "compress":
            weights = self.population_names()[0]
            recipes = [(f"g{generation:03d}-{i:03d}", weights, Recipe(op="copy", inputs=(weights,)))
                       for i in range(self.config.compress.candidates)]
        else:
            recipes = [(o.id, o.target, o.recipe) for o in toolbox.offspring(self.population, generation)]
        children, skipped = [], 0
        for cid, target, recipe in recipes:
            child = {"id": cid, "target": target, "recipe": recipe.to_dict(), "plan": [], "trial": None}
            if self.study is not None:
                child["plan"], child["trial"], over = self.ask_plan()
                skipped += over
            children.append(child)
        if skipped:
            self.log(f"generation {generation + 1}: {skipped} plans predicted over the size budget, told PRUNED, not scored")
        if self.study is not None:
            state["pending"] = {"generation": generation, "children": children, "plans_over_budget": skipped}
            self.store.write_state(state)
        return children

    def ask_plan(self) -> tuple[list, int, int]:
        """(plan, trial number, plans skipped): ask until a plan is predicted to fit the budget.

        Selection ranks every over-budget candidate below every feasible one, so scoring one
        would only spend an evaluation; such a plan is told PRUNED with its predicted size. A
        plan whose size cannot be predicted, or that does not fit the model (a FAIL trial once
        scored), goes on as it is; after MAX_PLAN_ASKS the last plan is scored whatever its size.
        """
        for asked in range(1, MAX_PLAN_ASKS + 1):
            trial = self.study.ask()
            plan = suggest_plan(trial, self.config.compress.space, self.num_layers)
            predicted = self.predicted_params(plan) if self.max_params is not None and asked < MAX_PLAN_ASKS else None
            if predicted is None or predicted <= self.max_params:
                return plan, trial.number, asked - 1
            prune_over_budget(self.study, trial, predicted, self.max_params)

    def enqueue_budget_anchors(self) -> None:
        """Queue the first generation's plans: anchors sized to the budget (search/space.py)."""
        if self.max_params is None or not self.config.compress.budget_anchors:
            return

        def fits(plan: list) -> bool:
            predicted = self.predicted_params(plan)
            return predicted is not None and predicted <= self.max_params

        anchors = budget_anchors(self.config.compress.space, self.num_layers, fits, limit=self.generation_size())
        for params in anchors:
            self.study.enqueue_trial(params)
        if anchors:
            self.log(f"first generation: {len(anchors)} plans sized to the budget of {self.max_params:,.0f} parameters")

    def predicted_params(self, plan: list) -> int | None:
        """The candidate's parameter count from shapes alone; None if unknown before the work."""
        try:
            return predict_num_params(parse_plan(plan), self.base_config)
        except PlanError:
            return None

    def run_generation(self, toolbox, generation: int, state: dict) -> dict:
        started = time.perf_counter()
        children = self.children(toolbox, generation, state)
        jobs = [self.job(c["id"], Recipe.from_dict(c["recipe"]), generation=generation, plan=c["plan"], trial=c["trial"]) for c in children]
        results = self.evaluate(jobs, f"generation {generation + 1}/{self.config.evolver.generations}")
        candidates = []
        for child in children:
            result = results[child["id"]]
            if self.study is not None:
                tell_result(self.study, child["trial"], result, self.max_params)
            candidates.append(self.member(child["id"], Recipe.from_dict(child["recipe"]), result, child["plan"]))
        if self.pareto:
            next_population = select_pareto(self.population + candidates, max(self.generation_size(), len(self.population)))
        else:
            next_population = [toolbox.select(target, child) for target, child in zip(self.population, candidates)]
        previous = {m["id"] for m in self.population}
        accepted = [m for m in next_population if m["id"] not in previous]
        checksums = dict(state["weight_checksums"])
        self.keep_new_weights(accepted, checksums)  # before the population merge reads them
        merged = self.score_population_merge(generation, next_population)
        # The Pareto front is over every candidate scored; a merge run's hall of fame only over
        # members (a rejected offspring is worse than the member it challenged).
        seen = candidates if self.pareto else []
        best = self.best_of([member_from_json(m) for m in state["hall_of_fame"]] + next_population + seen + merged)
        self.keep_new_weights(best, checksums)
        kept = {m["id"] for m in next_population + best}
        checksums = {k: v for k, v in checksums.items() if k in kept}
        self.population = next_population
        record = generation_record(generation, next_population, len(children), len(accepted), time.perf_counter() - started)
        if self.pareto:
            record["pareto_size"] = len(best)
        if state.get("pending"):
            record["plans_over_budget"] = state["pending"].get("plans_over_budget", 0)
        self.store.append_logbook(record)
        self.log(
            f"generation {generation + 1}: best {record['best']:.4f} mean {record['mean']:.4f}, "
            f"{len(accepted)}/{len(children)} new members" + (f", Pareto front {len(best)}" if self.pareto else "")
        )
        state = {
            **state,
            "generation": generation + 1,
            "population": [member_to_json(m) for m in next_population],
            "hall_of_fame": [member_to_json(m) for m in best],
            "weight_checksums": checksums,
            "evaluations": state["evaluations"] + len(children),
            "pending": None,
        }
        self.store.write_state(state)
        self.store.prune_weights(checksums)
        self.release_refs({m["id"] for m in next_population} | ({m["id"] for m in best} if self.pareto else set()))
        return state

    def release_refs(self, live: set[str]) -> None:
        """Let Ray free weight sets nothing will read again (offspring read the population; the
        test scoring reads parents, the population and, with two objectives, the Pareto front),
        so the object store does not fill and spill to disk."""
        self.refs = {k: v for k, v in self.refs.items() if k in live or k in self.parent_dirs}

    def score_population_merge(self, generation: int, population: list) -> list:
        """The paper's population merge: scored and offered to the hall of fame, never selected."""
        if not self.config.evolver.merge_population or self.pareto:
            return []
        recipe = population_merge_recipe(self.config, [m["id"] for m in population], generation)
        merge_id = f"m{generation:03d}"
        result = self.evaluate([self.job(merge_id, recipe)], "population merge")[merge_id]
        self.log(f"generation {generation + 1}: population merge ({recipe.op}) dev score {result['score']:.4f}")
        return [self.member(merge_id, recipe, result)]

    def keep_new_weights(self, members, checksums: dict) -> None:
        """Store members whose weights are new (not a parent's, not stored yet): a compress
        run's candidates only re-plan a parent's weights (a copy recipe) and store nothing."""
        for member in members:
            recipe = Recipe.from_dict(member["recipe"])
            if member["id"] not in checksums and member["id"] not in self.parent_dirs and recipe.op != "copy":
                checksums[member["id"]] = self.keep_weights(recipe, member["id"])

    def keep_weights(self, recipe: Recipe, member_id: str) -> str:
        """Replay an accepted offspring on the driver (CPU, fp32), store it and publish it."""
        import ray

        inputs = {wid: from_numpy_state(ray.get(self.refs[wid])) for wid in recipe.input_ids()}
        weights = materialize(recipe, inputs, self.names, list(self.config.evolver.exclude))
        checksum = self.store.save_weights(member_id, weights)
        self.refs[member_id] = put_weights(weights)
        return checksum

    def finish(self, state: dict) -> dict:
        """Score parents and the best members on the test splits; export the top candidates."""
        names = [p.name for p in self.config.parents.all()]
        if self.pareto:  # the whole Pareto front found so far
            chosen = [member_from_json(m) for m in state["hall_of_fame"]]
        else:
            chosen = sorted(self.population, key=member_score, reverse=True)[: max(1, self.config.export_top)]
        jobs = [self.job(n, Recipe(op="copy", inputs=(n,)), split="test") for n in names]
        jobs += [self.job(m["id"], self.stored_recipe(m), split="test", plan=m.get("plan")) for m in chosen if m["id"] not in names]
        self.evaluate(jobs, "test splits")
        state = {**state, "status": "finished", "finished": time.time()}
        self.store.write_state(state)
        return state

    def stored_recipe(self, member) -> Recipe:
        """Read a member's stored weights; a compress candidate re-plans its parent's weights."""
        if member["id"] in self.refs:
            return Recipe(op="copy", inputs=(member["id"],))
        return Recipe.from_dict(member["recipe"])

    def open_study(self):
        from search.tuning.study import open_study

        compress = self.config.compress
        return open_study(self.store.root, self.config.name, compress.sampler, self.config.seed, self.generation_size(), latency=self.timed)

    def generation_size(self) -> int:
        """Candidates per generation: compress runs ask `candidates`, the others one per member."""
        return self.config.compress.candidates if self.config.mode == "compress" else len(self.population)

    def shutdown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()


def start_search(config_path: str | Path, run_dir: str | Path | None = None, *, address=None, workers=None, quiet=False) -> Path:
    config = load_config(config_path)
    if workers:
        config.workers.count = workers
    root = Path(run_dir) if run_dir else default_run_dir(config)
    store = RunStore(root)
    if store.exists():
        raise ConfigError(f"{root}: a run is already there (use `evofuse resume {root}`, or another --run-dir)")
    root.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(root)
    (root / "config.yaml").write_text(dump_config(config))
    return _run(config, store, address, quiet)


def resume_search(run_dir: str | Path, *, config_path: str | Path | None = None, address=None, quiet=False) -> Path:
    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(store.config_path)
    if config_path is not None:
        given = load_config(config_path)
        if given.fingerprint() != config.fingerprint():
            raise ConfigError(f"{config_path}: differs from the config {run_dir} was started with ({changed_field(config, given)})")
    state = store.read_state()
    if state is not None and state.get("fingerprint") != config.fingerprint():
        raise ConfigError(f"{store.config_path}: changed since the run started; restore it or start a new run")
    store.repair_logs()
    return _run(config, store, address, quiet)


def changed_field(old: RunConfig, new: RunConfig) -> str:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                found = walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
                if found:
                    return found
            return None
        return None if x == y else f"{path}: {x!r} -> {y!r}"

    return walk(a, b, "") or "unknown field"


def _run(config: RunConfig, store: RunStore, address, quiet: bool) -> Path:
    state = store.read_state()  # a corrupt checkpoint is refused before anything starts
    if state is not None:
        store.verify_weights(state["weight_checksums"])
        if state["status"] == "finished":
            tqdm.write(f"{store.root}: already finished", file=sys.stderr)
            return store.root
    search = Search(config, store, address=address, quiet=quiet)
    try:
        search.start()
        search.run()
    finally:
        search.shutdown()
    if config.export_top:
        from search.results.export import export_top

        export_top(store.root, config.export_top, store.exports_dir, quiet=quiet)
    return store.root
