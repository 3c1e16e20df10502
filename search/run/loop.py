"""The run loop: one driver process owns the population, the journal and the checkpoints.

A run (see DESIGN.md, "The flow of one generation"):

    start       resolve parents (fine-tuning experts once, cached), check they share every
                tensor, start Ray and the actor pool, publish the parents' weights
    initial     score the parents and seed merges; they are the first population
    generation  the mode proposes candidates (Evolver offspring and/or plans from Optuna),
                the scorer scores them (journalled as they arrive), Optuna is told, the mode
                selects survivors, new members' weights are stored, the hall of fame / Pareto
                front is updated, a logbook line and a checkpoint are written
    finish      parents and the best candidates are scored on the test splits (reported,
                never used to select); the parents', and after each generation those of the
                members that would be final then, are scored during the generations by actors
                that would otherwise wait (`Scorer.score_when_idle`)

Resume: offspring ids and recipes are a pure function of (seed, generation, population), and
the plans asked for a generation are checkpointed before it is scored, so a resumed run
re-derives the same candidates, takes the finished ones from the journal and scores only the
rest. The population changes only in the checkpoint written at the end of a generation.
"""
from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from compression.arch import num_blocks
from evolve.population import generation_record, make_toolbox, member_from_json, member_score, member_to_json
from evolve.recipe import Recipe

from search.config import ConfigError, RunConfig, population_merge_recipe, seed_recipe
from search.fitness.spec import kind_class
from search.models.experts import resolve_parents
from search.models.sources import tensor_index
from search.models.tensors import check_same_tensors
from search.run.candidate import Candidate, Evaluation, format_score
from search.run.modes import Mode, make_mode
from search.run.scoring import STOPPED, Log, Scorer, all_failed, check_generation, failure_of
from search.run.stages import StagedScoring, stage_plan, staged_scoring
from search.run.store import RunStore
from search.run.weights import WeightBank
from search.run.workers import EvaluatorPool, ScoreJob, WorkerSpec, init_ray, rebuilt_name


def keep_rebuilt_of(directory: Path, final: list[Candidate]) -> None:
    """Drop from `directory` the kept rebuilt models (and unfinished writes) of candidates the
    finish would not test (`final`): those not selected, and members that left the front. Called
    before a generation, whose candidates' models then wait there until the next call."""
    if not directory.is_dir():
        return
    wanted = {rebuilt_name(c) for c in final if c.plan}
    for path in directory.iterdir():
        if path.name not in wanted:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Search:
    config: RunConfig
    store: RunStore
    address: str | None = None
    quiet: bool = False
    log: Log = field(init=False)
    mode: Mode | None = None
    pool: EvaluatorPool | None = None
    scorer: Scorer | None = None
    planner: object = None  # search.tuning.planner.Planner, for runs whose candidates carry plans
    staged: StagedScoring | None = None  # staged fitness (None: every candidate scored in full)
    population: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = Log(self.quiet)
        self.task_weights = {t.name: t.weight for t in self.config.tasks}

    # ---- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        from transformers import AutoConfig

        config, workers = self.config, self.config.workers
        parent_dirs = resolve_parents(config, quiet=self.quiet)
        names = check_same_tensors({n: tensor_index(p) for n, p in parent_dirs.items()}, where="parents", error=ConfigError)
        init_ray(self.address or workers.address, quiet=self.quiet)
        compressing = config.mode != "merge"
        spec = WorkerSpec(
            template_dir=str(parent_dirs[config.parents.base.name]),
            tasks=[t.model_dump(mode="json") for t in config.tasks],
            names=names,
            exclude=list(config.evolver.exclude),
            dtype=workers.dtype,
            threads=max(1, int(workers.num_cpus)),
            calibration=config.compress.space.calibration.model_dump(),
            latency=config.compress.latency.model_dump() if compressing and config.compress.latency else None,
            proxy=config.fitness.proxy.model_dump() if config.fitness.proxy else None,
            shared_recipes=config.evolver.share_recipe,
            recipe_stats_bytes=None if workers.recipe_stats_gib is None else int(workers.recipe_stats_gib * 2**30),
            # actors on the driver's host share the run directory: a test split reads the rebuilt model
            rebuilt_dir=str(self.rebuilt_dir) if compressing else None,
            rebuilt_host=socket.gethostname(),
        )
        self.parent_dirs = parent_dirs
        self.base_config = AutoConfig.from_pretrained(spec.template_dir, trust_remote_code=False)
        self.pool = EvaluatorPool(spec, workers.count, workers.num_cpus, workers.num_gpus, workers.max_retries)
        self.weights = WeightBank(self.store, names, list(config.evolver.exclude))
        self.weights.publish_parents(parent_dirs)
        self.scorer = Scorer(self.store, self.pool, self.weights, self.task_weights, self.base_config, self.log,
                             joiners={t.name: kind_class(t.kind).joined_metrics for t in self.config.tasks})

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        state = self.store.read_state() or self.initial_state()
        self.restore(state)
        evo = self.config.evolver
        toolbox = make_toolbox(self.config.seed, evo.generations, evo.F, evo.CR, evo.strategy, evo.reference,
                               per_member=evo.offspring_per_member, shared_recipe=evo.share_recipe)
        for generation in range(state["generation"], evo.generations):
            # What the finish would score on the test splits were the run to end here (the
            # parents, the members it would report) is scored by actors that would otherwise
            # wait (a generation's last full evaluation runs alone), not after the last generation.
            final = self.final_tests(state)
            keep_rebuilt_of(self.rebuilt_dir, final)
            self.scorer.score_when_idle([ScoreJob(c, split="test") for c in final])
            state = self.run_generation(toolbox, generation, state)
        return self.finish(state)

    def initial_state(self) -> dict:
        """Score the parents and seed merges; they make the first population."""
        names = [p.name for p in self.config.parents.all()]
        seeds = {seed.name: seed_recipe(self.config, seed) for seed in self.config.evolver.seeds}
        checksums = self.weights.keep_all(seeds)
        candidates = [Candidate.copy_of(n) for n in names] + [Candidate(id=n, recipe=r) for n, r in seeds.items()]
        staged = self.config.fitness.staged  # members' per-example scores serve every later comparison
        jobs = [ScoreJob(c, per_example=staged, keep_rebuilt=True) for c in candidates]
        if staged:  # and, with a screening dtype, those of the screening items they are compared on
            dev_items = self.pool.task_sizes("dev")
            plan = stage_plan(self.config, dev_items)
            jobs = [plan.with_screening(job, None) for job in jobs]
        results = self.scorer.evaluate(jobs, "parents")
        check_generation(results.values(), "the first population (parents and seed merges)")
        dense_params = results[names[0]].num_params
        self.mode = make_mode(self.config, self.resolve_budget(dense_params))
        members = [self.mode.objectives.member(results[n]) for n in self.mode.population_ids() + list(seeds)]
        state = {
            "generation": 0,
            "status": "running",
            "parents": {n: {"score": results[n].score, "num_params": results[n].num_params, "latency_ms": results[n].latency_ms}
                        for n in names},
            "dense_params": dense_params,
            "weight_checksums": checksums,
            "evaluations": len(results),
            "fingerprint": self.config.fingerprint(),
            "started": time.time(),
            "population": [member_to_json(m) for m in members],
            "hall_of_fame": [member_to_json(m) for m in self.mode.best_of(members)],
        }
        if staged:
            state["dev_items"] = dev_items
        self.store.write_state(state)
        return state

    def resolve_budget(self, dense_params: int | None) -> float | None:
        """`compress.max_params` as a count (a fraction <= 1 is of the dense model)."""
        budget = self.config.compress.max_params
        if budget is None or self.config.mode == "merge":
            return None
        return budget * dense_params if budget <= 1 else budget

    def restore(self, state: dict) -> None:
        self.mode = make_mode(self.config, self.resolve_budget(state["dense_params"]))
        self.population = [member_from_json(m) for m in state["population"]]
        self.weights.restore(state["weight_checksums"])
        if self.config.fitness.staged:
            self.staged = staged_scoring(self.config, state["dev_items"], self.scorer, self.mode)
        if self.mode.uses_plans:
            self.planner = self.open_planner()
        self.mode.open(self.store, self.base_config, self.log)

    def open_planner(self):
        from search.tuning.gene_plans import open_gene_placer
        from search.tuning.planner import Planner
        from search.tuning.study import open_study

        compress = self.config.compress
        study = open_study(self.store.root, self.config.name, compress.sampler, self.config.seed,
                           self.mode.generation_size(self.population), self.mode.objectives.directions)
        blocks = num_blocks(self.base_config)
        genes = open_gene_placer(compress.space, blocks, self.config.seed, study,
                                 self.parent_dirs[self.mode.structure_parent()], self.log)
        planner = Planner(study, compress.space, self.base_config, blocks, self.mode.objectives.max_params, genes=genes)
        if not study.trials and compress.budget_anchors:
            queued = planner.enqueue_anchors(limit=self.mode.generation_size(self.population))
            if queued:
                self.log(f"first generation: {queued} plans sized to the budget of {planner.max_params:,.0f} parameters")
        return planner

    # ---- one generation ----------------------------------------------------------------------
    def candidates(self, toolbox, generation: int, state: dict) -> list[Candidate]:
        """This generation's candidates; with plans, checkpointed before they are scored."""
        pending = state.get("pending")
        if pending and pending["generation"] == generation:
            return [Candidate.from_json(c) for c in pending["children"]]  # asked before a kill
        offspring = self.mode.offspring(toolbox, self.population, generation)
        if not self.mode.uses_plans:
            return offspring
        asked, skipped = [], 0
        for candidate in offspring:
            planned, over = self.planner.ask_candidate(candidate, self.population)
            asked.append(planned)
            skipped += over
        if skipped:
            self.log(f"generation {generation + 1}: {skipped} plans predicted over the size budget, told PRUNED, not scored")
        state["pending"] = {"generation": generation, "children": [c.to_json() for c in asked], "plans_over_budget": skipped}
        self.store.write_state(state)
        return asked

    def run_generation(self, toolbox, generation: int, state: dict) -> dict:
        started = time.perf_counter()
        candidates = self.candidates(toolbox, generation, state)
        results = self.score(candidates, generation, state)
        # The run goes on (members stay as they were), but a generation in which nothing could be
        # scored almost always has one cause in the setup (a task, a dtype, a plan), not in its
        # candidates, and every later generation would fail the same way.
        failed = all_failed(failure_of(results[c.id], self.scorer.journal) for c in candidates)
        if failed:
            self.log.warn(f"generation {generation + 1}: {failed} (each row is in {self.store.journal_path})")
        objectives = self.mode.objectives
        if self.planner is not None:
            for c in candidates:
                r = results[c.id]
                if r.status == STOPPED:
                    self.planner.tell_stopped(c.trial, r.reason)
                else:
                    self.planner.tell(c.trial, objectives.values(r) if r.ok else None, r.reason or r.status)
        self.mode.tell(candidates, results)
        finals = [(c, objectives.member(results[c.id])) for c in candidates if results[c.id].status != STOPPED]
        scored = [member for _, member in finals]
        next_population = self.mode.select(toolbox, self.population, finals)
        previous = {m["id"] for m in self.population}
        accepted = [m for m in next_population if m["id"] not in previous]
        checksums = dict(state["weight_checksums"])
        if self.mode.stores_members:  # a recipe run's members replay from the parents instead
            # Stored before the population merge reads them. In a merge run nothing reads a
            # replaced member once its replacement is replayed (the merge and the hall of fame
            # read the new population; stored members are not replayed again): it leaves the
            # object store first. A joint run's front may still take this generation's
            # candidates, whose recipes read the old population.
            live = None if self.mode.front_of_all else {m["id"] for m in next_population}
            self.weights.keep_new(accepted, checksums, live)
        merged = self.score_population_merge(generation, next_population)
        # The Pareto front is over every candidate scored; a merge run's hall of fame only over
        # members (a rejected offspring is worse than the member it challenged).
        seen = scored if self.mode.front_of_all else []  # stopped candidates are never selected
        best = self.mode.best_of([member_from_json(m) for m in state["hall_of_fame"]] + next_population + seen + merged)
        if self.mode.stores_members:
            self.weights.keep_new(best, checksums)
        kept = {m["id"] for m in next_population + best}
        checksums = {k: v for k, v in checksums.items() if k in kept}
        self.population = next_population
        record = generation_record(generation, next_population, len(candidates), len(accepted), time.perf_counter() - started)
        if self.staged is not None:
            record.update(self.staged.counts(candidates, results))
        if self.mode.front_of_all:
            record["pareto_size"] = len(best)
        if state.get("pending"):
            record["plans_over_budget"] = state["pending"].get("plans_over_budget", 0)
        self.store.append_logbook(record)
        self.log(f"generation {generation + 1}: best {format_score(record['best'])} mean {format_score(record['mean'])}, "
                 f"{len(accepted)} of {len(candidates)} offspring accepted" + (f", Pareto front {len(best)}" if self.mode.front_of_all else ""))
        state = {
            **state,
            "generation": generation + 1,
            "population": [member_to_json(m) for m in next_population],
            "hall_of_fame": [member_to_json(m) for m in best],
            "weight_checksums": checksums,
            "evaluations": state["evaluations"] + len(candidates),
            "pending": None,
        }
        self.store.write_state(state)
        self.store.prune_weights(checksums)
        # Offspring read the population; the test scoring reads it and, with sizes, the front.
        self.weights.release({m["id"] for m in next_population} | ({m["id"] for m in best} if self.mode.front_of_all else set()))
        return state

    def score(self, candidates: list[Candidate], generation: int, state: dict) -> dict[str, Evaluation]:
        """The evaluation selection sees for each candidate: its full dev scores, or its stop."""
        desc = f"generation {generation + 1}/{self.config.evolver.generations}"
        if self.staged is None:
            subsample = self.config.evolver.subsample  # a fresh draw per generation when set; else the
            seed = generation if subsample else 0  # tasks' own fixed items, as the parents were scored
            jobs = [ScoreJob(c, subsample=subsample, subsample_seed=seed, keep_rebuilt=True) for c in candidates]
            return self.scorer.evaluate(jobs, desc)
        return self.staged.score(candidates, desc, state["hall_of_fame"])

    def score_population_merge(self, generation: int, population: list) -> list:
        """The paper's population merge: scored and offered to the hall of fame, never selected."""
        if not self.config.evolver.merge_population or self.mode.uses_plans:
            return []
        recipe = population_merge_recipe(self.config, [m["id"] for m in population], generation)
        merge = Candidate(id=f"m{generation:03d}", recipe=recipe, generation=generation)
        result = self.scorer.evaluate([ScoreJob(merge, per_example=self.staged is not None)], "population merge")[merge.id]
        self.log(f"generation {generation + 1}: population merge ({recipe.op}) dev score {result.score:.4f}")
        return [self.mode.objectives.member(result)]

    def final_tests(self, state: dict) -> list[Candidate]:
        """What the finish scores on the test splits, were the run to end at `state`: the parents,
        then the whole Pareto front found so far (joint / compress) or the best `export_top`
        members, oldest first (ids begin with their generation): the members most likely to
        still be there at the end come first in idle time."""
        names = [p.name for p in self.config.parents.all()]
        if self.mode.front_of_all:
            chosen = [member_from_json(m) for m in state["hall_of_fame"]]
        else:
            chosen = sorted(self.population, key=member_score, reverse=True)[: max(1, self.config.export_top)]
        members = sorted((m for m in chosen if m["id"] not in names), key=lambda m: m["id"])
        return [Candidate.copy_of(n) for n in names] + [
            Candidate(id=m["id"], recipe=self.weights.recipe_for_test(m["id"], Recipe.from_dict(m["recipe"])),
                      plan=tuple(m.get("plan") or ())) for m in members]

    @property
    def rebuilt_dir(self) -> Path:
        """Rebuilt models of candidates with a plan, kept for their test splits
        (`ScoreJob.keep_rebuilt`); gone when the run finishes."""
        return self.store.root / "rebuilt"

    def finish(self, state: dict) -> dict:
        """Score parents and the best members on the test splits; mark the run finished."""
        # those scored in idle time (`run`) are journalled, or finish beside the rest
        self.scorer.evaluate_final([ScoreJob(c, split="test") for c in self.final_tests(state)], "test splits")
        shutil.rmtree(self.rebuilt_dir, ignore_errors=True)  # every test split is journalled
        state = {**state, "status": "finished", "finished": time.time()}
        self.store.write_state(state)
        return state


__all__ = ["Search"]
