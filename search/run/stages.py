"""Staged fitness in a run: which items each stage scores, and who goes on.

Stage k scores a seeded subset of each dev task (nested, the last stage every item;
`search.fitness.staged.stage_subsets`), drawn afresh for each generation with
`fitness.resample` (`StagePlan.indices` says why), or the first items of a chosen order with
`fitness.items` (`search.fitness.items`: where siblings disagree), or, for compress / joint runs with a proxy,
stage 0 is the cheap proxy task (the `kl` task: how far the compressed candidate's next-token
distribution is from its own dense weights') and the dev stages follow. Every stage is scored with
per-example scores, so any later comparison is paired and free: a member's scores on any
subset are a filter of its full per-example record in the journal, and a screening stage after
another scores only the items it adds (`StagePlan.extends`; the driver joins the two rows).

After each stage but the last, a candidate goes on while it can still win:
- merge runs: of one member's offspring (with `evolver.offspring_per_member` > 1) those a race
  at `fitness.race` does not put behind their best sibling (`StageJudge.race_stops`; no race by
  default), then the best `fitness.advance` by stage score (one number, or one per stage) are
  its contenders, and a contender goes on unless its stage score is worse than its target
  member's on the same items by more than the one-sided paired margin at `fitness.confidence`;
- compress / joint: no member of the current front, with no more parameters (and no more
  latency), beats it by more than that margin (at a proxy stage, a member of its own recipe:
  `StageJudge.pareto_survivors`); of one member's offspring the `fitness.advance`
  that lead the front furthest at their own size go on (`StageJudge.pareto_siblings`). Without
  siblings each candidate runs through its stages in one chain on one actor (depth first);
  with them a member's offspring go through each stage together, since siblings are compared,
  and each family goes on as soon as its last sibling is in (`StagedScoring.score_by_family`).
With `fitness.screen_dtype` the stages before the last run under autocast in that dtype and the
last at the workers' own (`StagePlan.job`); a member is then compared at a screening stage with
what it scored in that dtype (`screening_examples`): every job that scores a future member in full
also scores, apart, the screening items of the draws it will meet (`StagePlan.with_screening`).
A stopped candidate is journalled (status `stopped`, the stage it reached, its partial
metrics, the reason), told to Optuna as PRUNED and never selected; with `fitness.audit`, a
seeded fraction of those the paired test stopped (compress / joint: and of the siblings stopped
beside the one that went on) is fully scored anyway so the run measures its false rejections.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Mapping

from search.errors import ConfigError
from search.fitness.items import ordered_stage_items
from search.fitness.spec import kind_class
from search.fitness.staged import audit_selected, compare, dominated_beyond_margin, paired_difference, stage_subsets
from search.run.candidate import Candidate, Evaluation
from search.run.scoring import STOPPED, Scorer
from search.run.workers import PROXY, ScoreJob


@dataclass(frozen=True)
class StagePlan:
    """The items each stage scores: per stage, the tasks it scores, and per generation the item
    indices of each task (`indices`)."""

    tasks: tuple[tuple[str, ...], ...]
    fractions: tuple[float, ...]
    task_sizes: tuple[tuple[str, int], ...]  # (dev task, its items), the proxy excluded
    seed: int
    min_items: int
    resample: bool = False  # a fresh draw of the subsets per generation
    screen_dtype: str | None = None  # the dtype of the stages before the last (`fitness.screen_dtype`)
    generations: int = 1  # the run's generations: the draws a member can still be compared on
    joins_last: bool = False  # the last stage scores only what the screens did not (`extends`)
    # chosen stage items (`fitness.items`): per dev task, item positions most useful first; the
    # same items every generation, so no fresh draws (`resample` is then off)
    item_order: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    @property
    def count(self) -> int:
        return len(self.tasks)

    @property
    def last(self) -> int:
        return self.count - 1

    def indices(self, generation: int | None = None) -> tuple[dict[str, list[int]] | None, ...]:
        """Per stage, {task: item indices} (None: every item) for the candidates of `generation`.

        Why a fresh draw per generation (`resample`): with (1 + lambda) a member is the sibling
        that scored best on its generation's first-stage items, the maximum of lambda noisy
        estimates, so on those very items it is lucky; its offspring inherit only part of that
        luck, and judged against it on the same items again they look worse than they are. And
        with one draw for the run, every generation's siblings are chosen by the same few items,
        which steers the search toward them. A new draw carries neither, and the comparison
        stays paired: the member is scored on every item, the siblings of a generation share
        theirs. (Measured on the staged benchmark's seed 3, the fresh draws alone did not stop
        the false rejections, 15 of 52 stops against 28 of 76; the variance floor and the
        ranking order of `StageJudge.merge_survivors` did.)
        """
        proxy = self.tasks[0] == (PROXY,)
        if self.item_order is not None:  # chosen, not drawn: one set of items for the run
            return _ordered_indices(self.fractions, self.task_sizes, self.min_items, proxy, self.item_order)
        draw = (generation or 0) if self.resample else 0
        return _drawn_indices(self.fractions, self.task_sizes, self.seed, self.min_items, proxy, draw)

    def job(self, candidate: Candidate, stage: int, member: bool = True) -> ScoreJob:
        """The job scoring `candidate` at `stage`, narrowed to the items the stage adds when it
        `extends` the one before; a last-stage job of a candidate that may become a member
        (`member`: not an audit, which is scored whole) also scores its later screening items
        (`with_screening`)."""
        drawn = self.indices(candidate.generation)
        job = ScoreJob(candidate, stage=stage, tasks=self.tasks[stage], indices=drawn[stage], per_example=True)
        if stage < self.last:
            return replace(self.added_items(job, drawn), autocast=self.screen_dtype)
        if not member:  # an audit: stopped at some stage, scored whole
            return job
        job = replace(job, keep_rebuilt=True)  # a member-to-be: its test split will read its rebuilt model
        return self.added_items(self.with_screening(job, candidate.generation), drawn)

    def extends(self, stage: int) -> bool:
        """Whether `stage` scores only the items it adds to the stage before, whose scores a
        candidate that went on already holds: both score the dev tasks (the stages are nested)
        in one precision. Screening stages always do; the last stage, the candidate's full
        record, only with `joins_last`: every task's kind rebuilds all its metrics from the two
        parts (`FitnessTask.joined_metrics`) and the screens run at the workers' own precision
        (no `screen_dtype`; `stage_plan` drops one equal to `workers.dtype`)."""
        same_items = 0 < stage and self.tasks[stage] == self.tasks[stage - 1]
        return same_items and (stage < self.last or self.joins_last)

    def added_items(self, job: ScoreJob, drawn: tuple) -> ScoreJob:
        """`job` narrowed to the items its stage adds to the stage before (`extends`), when it
        adds some; the driver joins the two rows (`Evaluation.joined`). With EvoPress-style
        steps, e.g. stages [1/16, 1/4, 1], a contender's second step then scores 3/16 of each
        task, not 4/16 (and with `joins_last` its full evaluation 3/4 of each task)."""
        if not self.extends(job.stage):
            return job
        every = {t: range(n) for t, n in self.task_sizes}
        before, now = drawn[job.stage - 1], drawn[job.stage] or every
        added = {t: sorted(set(now[t]) - set(before[t])) for t in job.tasks}
        added = {t: items for t, items in added.items() if items}  # a small task may add none
        if not added:
            return job  # the stage repeats the one before (tiny tasks): scored whole, as before
        return replace(job, tasks=tuple(added), indices=added, extends=job.stage - 1)

    def with_screening(self, job: ScoreJob, generation: int | None) -> ScoreJob:
        """`job` (a full dev scoring) plus, in the screening dtype, the screening items of every
        later generation's draw: those a member made in `generation` (None: the first population)
        is compared on at the screening stages. Without a screening dtype, `job` itself."""
        if self.screen_dtype is None or self.screened is None:
            return job
        first = 0 if generation is None else generation + 1
        draws = range(first, self.generations) if self.resample else range(1)
        if not draws:  # made in the last generation: never compared again
            return job
        items = {t: sorted({i for d in draws for i in self.indices(d)[self.screened][t]}) for t, _ in self.task_sizes}
        return replace(job, per_example=True, screen_dtype=self.screen_dtype, screen_indices=items)

    @property
    def screened(self) -> int | None:
        """The last screening stage over dev items (the stages are nested: it holds every earlier
        one's items), or None when the only stage before the last is a proxy."""
        dev_stages = [k for k in range(self.last) if self.tasks[k] != (PROXY,)]
        return dev_stages[-1] if dev_stages else None

    def compared_at(self, stage: int) -> bool:
        """Whether a member's `stage` comparisons read its screening examples (scored in the
        screening dtype), not its full-precision ones."""
        return self.screen_dtype is not None and stage < self.last and self.tasks[stage] != (PROXY,)


@lru_cache(maxsize=64)
def _drawn_indices(fractions: tuple[float, ...], task_sizes: tuple[tuple[str, int], ...], seed: int, min_items: int,
                   proxy: bool, draw: int) -> tuple[dict[str, list[int]] | None, ...]:
    """The stages' item indices of one draw (draw 0: the run's first, salted by the task alone)."""
    salt = lambda task: task if draw == 0 else f"{task}/draw {draw}"  # noqa: E731
    subsets = {t: stage_subsets(n, fractions, seed, salt=salt(t), min_items=min_items) for t, n in task_sizes}
    drawn = [{t: subsets[t][k] for t in subsets} for k in range(len(fractions) - 1)] + [None]
    return tuple(([None] if proxy else []) + drawn)


@lru_cache(maxsize=8)
def _ordered_indices(fractions: tuple[float, ...], task_sizes: tuple[tuple[str, int], ...], min_items: int, proxy: bool,
                     item_order: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[dict[str, list[int]] | None, ...]:
    """The stages' item indices taken from an item order (`search.fitness.items`)."""
    order, chosen = dict(item_order), {}
    for t, n in task_sizes:
        try:
            chosen[t] = ordered_stage_items(order[t], n, fractions, min_items)
        except ValueError as exc:
            raise ConfigError(f"fitness.items: task {t!r}: {exc}") from None
    staged = [{t: chosen[t][k] for t in chosen} for k in range(len(fractions) - 1)] + [None]
    return tuple(([None] if proxy else []) + staged)


def plan_stages(fractions: list[float], task_sizes: Mapping[str, int], seed: int, min_items: int, proxy: bool,
                resample: bool = False, screen_dtype: str | None = None, generations: int = 1,
                joins_last: bool = False, item_order: Mapping[str, list[int]] | None = None) -> StagePlan:
    """Stages over the run's dev tasks (`task_sizes`: items per task); a proxy stage first. With an
    `item_order` (`fitness.items`) the stages take its items (ConfigError when it does not fit a
    task), the same in every generation."""
    tasks = tuple(t for t in task_sizes if t != PROXY)
    stage_tasks = ([(PROXY,)] if proxy else []) + [tasks] * len(fractions)
    order = None if item_order is None else tuple((t, tuple(item_order[t])) for t in tasks)
    plan = StagePlan(tuple(stage_tasks), tuple(float(f) for f in fractions), tuple((t, int(task_sizes[t])) for t in tasks),
                     seed, min_items, resample and order is None, screen_dtype, generations,
                     joins_last and screen_dtype is None, order)
    if order is not None:
        plan.indices()  # an order that does not fit a task fails here, before anything is scored
    return plan


def screening_examples(evaluation: Evaluation, tasks: tuple[str, ...], items: Mapping[str, set] | None) -> Evaluation | None:
    """A member's full evaluation seen at a screening stage: each task's examples replaced by
    those it scored in the screening dtype (`screen_examples`), so a candidate's screening
    scores meet the member's in the same precision. None when it has none for some task, or
    they miss some of `items` (task -> the stage's item ids; None: not checked), e.g. in a run
    written before screening existed: its candidates are then not compared with the member at
    that stage (the full stage still is)."""
    metrics = {}
    for t in tasks:
        m = evaluation.metrics.get(t, {})
        screen = m.get("screen_examples")
        if not screen:
            return None
        if items is not None and not items.get(t, set()) <= set(screen["index"]):
            return None
        metrics[t] = {**m, "examples": screen}
    return replace(evaluation, metrics={**evaluation.metrics, **metrics})


def examples_of(evaluation: Evaluation, tasks: tuple[str, ...]) -> dict[str, dict] | None:
    """{task: per-example scores} of an evaluation, or None when it has none for some task."""
    found = {t: evaluation.metrics.get(t, {}).get("examples") for t in tasks}
    return found if evaluation.ok and all(found.values()) else None


def front_examples(front: list[tuple[Evaluation | None, tuple]], tasks: tuple[str, ...]) -> list[tuple[str, dict, tuple]]:
    """(member id, per-example scores on `tasks`, costs) of the front members that have them."""
    return [(e.id, examples_of(e, tasks), costs) for e, costs in front if e is not None and examples_of(e, tasks)]


def weights_for(tasks: tuple[str, ...], task_weights: Mapping[str, float]) -> dict[str, float]:
    """The aggregate's task weights restricted to a stage's tasks (the proxy weighs 1)."""
    return {t: (1.0 if t == PROXY else task_weights[t]) for t in tasks}


@dataclass
class StageJudge:
    """Decides, after a stage, which candidates go on; every rule reads journalled data only,
    so a resumed run re-derives the same decisions."""

    plan: StagePlan
    task_weights: Mapping[str, float]
    confidence: float
    advance: int | tuple[int, ...]  # per stage but the last, or one number for all (`fitness.advance`)
    run_seed: int
    audit: float
    audit_siblings: bool = False  # sibling stops are audited too (`audited`)
    race: tuple[float | None, ...] = ()  # per stage but the last, the siblings' race confidence (`fitness.race`)

    def advancing(self, stage: int) -> int:
        """How many of a member's offspring go on past `stage` (with a race: at most)."""
        return self.advance if isinstance(self.advance, int) else self.advance[stage]

    def racing(self, stage: int) -> float | None:
        """The confidence of the siblings' race after `stage`, or None."""
        return self.race[stage] if stage < len(self.race) else None

    def race_stops(self, stage: int, siblings: list[Candidate], mine: Mapping[str, dict], rank) -> dict[str, tuple]:
        """{candidate id: (reason, member id, "sibling")} for the offspring of each member that the
        paired test at `racing(stage)` puts behind their leader, the sibling ranked first by `rank`.

        A racing algorithm (F-race, irace) drops a configuration once it is significantly worse
        than the best on the instances seen so far, so how many go on follows how far apart they
        are, not a fixed count. The stage's items are drawn without replacement from each task's
        N dev items and a stop is about the full dev score, so the paired standard error carries
        the finite-population correction sqrt(1 - n/N): the fewer items left unscored, the less
        a difference on the scored ones can still change."""
        confidence = self.racing(stage)
        tasks = self.plan.tasks[stage]
        weights, population = weights_for(tasks, self.task_weights), {t: n for t, n in self.plan.task_sizes if t in tasks}
        stopped = {}
        for group in families(siblings):
            leader, *rest = sorted(group, key=rank)
            for c in rest:
                verdict = compare(mine[c.id], mine[leader.id], weights, confidence, population_sizes=population)
                if not verdict.can_still_win:
                    stopped[c.id] = (f"stage {stage + 1}: {verdict.diff:+.4f} against its sibling {leader.id} on {verdict.n} items, "
                                     f"beyond the race margin {verdict.margin:.4f}", c.target, "sibling")
        return stopped

    def merge_survivors(self, stage: int, rows: Mapping[str, Evaluation], rivals: Mapping[str, Evaluation | None],
                        candidates: list[Candidate]) -> dict[str, tuple]:
        """{candidate id: (reason, rival id, rule)} for the merge-run candidates stopped after `stage`.

        With a race (`racing(stage)`), first every offspring the paired test puts behind its best
        sibling stops (`race_stops`). Of one member's remaining offspring the best
        `advancing(stage)` by stage score are the contenders (all siblings share the member and
        the items, so this is also their order by paired difference) and the rest stop as
        siblings; a contender then goes on unless the paired test says it is worse than the member.
        The test comes second on purpose: it is sharper for a sibling that trails the member by a
        little on every item than for one that trails by much with noise, so filtering first
        promoted a worse sibling over better ones (seed 3 of the staged benchmark: a group 0.03
        behind on 11 items was stopped, a group 0.10 behind went on, and in full the first group
        beat the member and the second did not)."""
        tasks, weights = self.plan.tasks[stage], weights_for(self.plan.tasks[stage], self.task_weights)
        mine = {c.id: examples_of(rows[c.id], tasks) for c in candidates}
        stopped = {c.id: failed_at(rows[c.id], stage) for c in candidates if mine[c.id] is None}
        scored = [c for c in candidates if mine[c.id] is not None]
        ranks = lambda c: (-rows[c.id].score, c.id)  # noqa: E731
        if self.racing(stage) is not None:
            stopped.update(self.race_stops(stage, scored, mine, ranks))
        still_in = [c for c in scored if c.id not in stopped]
        stopped.update(sibling_stops(still_in, ranks, self.advancing(stage), stage, "scored higher"))
        for c in (c for c in scored if c.id not in stopped):  # the contenders
            rival = rivals.get(c.target)
            theirs = examples_of(rival, tasks) if rival is not None else None
            if theirs is None:
                continue
            verdict = compare(mine[c.id], theirs, weights, self.confidence)
            if not verdict.can_still_win:
                stopped[c.id] = (f"stage {stage + 1}: {verdict.diff:+.4f} against {c.target} on {verdict.n} items, "
                                 f"beyond the margin {verdict.margin:.4f}", c.target, "margin")
        return stopped

    def pareto_survivors(self, stage: int, rows: Mapping[str, Evaluation], front: list[tuple[Evaluation, tuple]],
                         candidates: list[Candidate], costs_of) -> dict[str, tuple]:
        """{candidate id: (reason, rival id, rule)} for compress / joint candidates a front member
        dominates beyond the margin after `stage`; `front` holds (the member's evaluation at this
        stage, its costs).

        A proxy stage measures each candidate against its own dense weights (the `kl` task: how
        far its plan moves its recipe's next-token distribution), so there it is compared only with
        front members of the same recipe: a compress run's every candidate, a joint run's none
        from another family. Across recipes the proxy says which plan hurts its own recipe more,
        not which candidate is better: in the joint demo (seed 2, `fitness.audit: 0.4`) every one
        of the paired test's ten stops at the KL stage was against another recipe's member, and one
        of the two audited, behind by 0.46 in KL per token, was 0.077 ahead in full dev score."""
        tasks, weights = self.plan.tasks[stage], weights_for(self.plan.tasks[stage], self.task_weights)
        usable = front_examples(front, tasks)
        recipes = {e.id: e.candidate.recipe.fingerprint() for e, _ in front if e is not None}
        stopped = {}
        for c in candidates:
            row = rows[c.id]
            mine = examples_of(row, tasks)
            if mine is None:
                stopped[c.id] = failed_at(row, stage)
                continue
            comparable = usable
            if tasks == (PROXY,):
                own = c.recipe.fingerprint()
                comparable = [u for u in usable if recipes[u[0]] == own]
            for member_id, theirs, costs in comparable:
                if dominated_beyond_margin(mine, costs_of(row), [(theirs, costs)], weights, self.confidence):
                    stopped[c.id] = (f"stage {stage + 1}: {member_id} of the front dominates it beyond the paired margin", member_id, "margin")
                    break
        return stopped

    def pareto_siblings(self, stage: int, rows: Mapping[str, Evaluation], front: list[tuple[Evaluation, tuple]],
                        candidates: list[Candidate], costs_of) -> dict[str, tuple]:
        """{candidate id: (reason, rival id, rule)} for the compress / joint offspring of one member
        beyond its best `advancing(stage)` after `stage` (EvoPress's (1 + lambda): all are judged on the
        cheap stage, the most promising go on).

        Siblings differ in size, so a raw stage score would favour the largest. Each is ranked by
        its lead over the front where it would enter: the paired difference of its stage score
        against every front member with no more parameters (and latency), the smallest of them.
        A candidate smaller than every front member is measured against the smallest members
        instead (its lead is then usually negative: it must be about as good as a larger member
        to go on). An earlier rule ranked such a candidate first, as opening a new part of the
        front, and in the joint demo it promoted an 83M-parameter plan over a 96M sibling whose
        full dev score would have been the run's best. In the first generation, whose front is
        the dense parents, this ranks the siblings by their stage score."""
        tasks, weights = self.plan.tasks[stage], weights_for(self.plan.tasks[stage], self.task_weights)
        usable = front_examples(front, tasks)

        def lead(c: Candidate) -> float:
            mine, costs = examples_of(rows[c.id], tasks), costs_of(rows[c.id])
            below = [theirs for _, theirs, member_costs in usable if all(m <= x for m, x in zip(member_costs, costs))]
            if not below and usable:  # smaller than the whole front: its smallest members
                smallest = min(member_costs for _, _, member_costs in usable)
                below = [theirs for _, theirs, member_costs in usable if member_costs == smallest]
            return min((paired_difference(mine, theirs, weights)[0] for theirs in below), default=0.0)

        ranks = lambda c: (-lead(c), -rows[c.id].score, c.id)  # noqa: E731
        return sibling_stops(candidates, ranks, self.advancing(stage), stage, "leads the front further",
                             against_leader=True)

    def audited(self, candidate_id: str, rule: str | None) -> bool:
        """Whether a stopped candidate is fully scored anyway: a seeded draw among the stops that
        can be false rejections. The paired test's (`margin`) always can. A sibling stop can too
        (the sibling that went on was chosen on the cheap stage, and the stopped one, scored in
        full, might have beaten it and the member), and is audited when `audit_siblings`: by
        default in compress / joint runs; in a merge run with (1 + lambda) sibling stops are most
        stops, so auditing them costs many full evaluations (`fitness.audit_siblings: true` asks
        for it; `benchmarks/audit_stops.py --siblings` measures it after a run)."""
        auditable = rule == "margin" or (rule == "sibling" and self.audit_siblings)
        return self.audit > 0 and auditable and audit_selected(self.run_seed, candidate_id, self.audit)


def families(candidates: list[Candidate]) -> list[list[Candidate]]:
    """The candidates grouped by the member they challenge (one group per member's offspring)."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.target, []).append(c)
    return list(groups.values())


def sibling_stops(candidates: list[Candidate], rank, advance: int, stage: int, why: str,
                  against_leader: bool = False) -> dict[str, tuple]:
    """{candidate id: (reason, rival, "sibling")} for each member's offspring ranked (by `rank`,
    first is best) beyond its best `advance`; the rival is the member, or (`against_leader`) the
    sibling ranked first, whose full score an audit of the stop is compared with."""
    stopped = {}
    for siblings in families(candidates):
        ranked = sorted(siblings, key=rank)
        for c in ranked[advance:]:
            stopped[c.id] = (f"stage {stage + 1}: {len(ranked) - advance} of {len(ranked)} siblings stop, {ranked[0].id} {why}",
                             ranked[0].id if against_leader else c.target, "sibling")
    return stopped


def stage_items(rows, tasks: tuple[str, ...]) -> dict[str, set] | None:
    """{task: the item ids a stage scored} read from its rows (a generation's candidates share
    them); None when no row has per-example scores."""
    for row in rows:
        found = examples_of(row, tasks)
        if found is not None:
            return {t: set(found[t]["index"]) for t in tasks}
    return None


def has_siblings(candidates: list[Candidate]) -> bool:
    """Whether some member has several offspring here (`evolver.offspring_per_member` > 1)."""
    return len({c.target for c in candidates}) < len(candidates)


def failed_at(row: Evaluation, stage: int) -> tuple:
    """The stop of a candidate whose stage gave no per-example scores (it failed there)."""
    return f"{row.status} at stage {stage + 1}", None, "failed"


def stopped_row(row: Evaluation, stage: int, reason: str, rival: str | None, rule: str) -> Evaluation:
    """The journal row of a stopped candidate: its partial metrics, the stage it reached, the
    member it lost to and the rule that stopped it (`margin`: the paired test, the audit's
    false-rejection count is about these; `sibling`: a better offspring of the same member went
    on; `failed`)."""
    return replace(row, status=STOPPED, stage=stage, reason=reason, extra={**row.extra, "rival": rival, "rule": rule})


@dataclass
class StagedScoring:
    """Scores a generation stage by stage (journalled per stage, so a resumed run repeats no
    finished stage) and stops the candidates that cannot win."""

    scorer: Scorer
    plan: StagePlan
    judge: StageJudge
    pareto: bool  # compress / joint: compare with the front, not with a target member
    latency: bool  # latency is a cost next to parameters

    def score(self, candidates: list[Candidate], desc: str, hall_of_fame: list[dict]) -> dict[str, Evaluation]:
        """Each candidate's outcome: its last stage's evaluation, or its stop."""
        if self.pareto and not has_siblings(candidates):
            return self.score_depth_first(candidates, desc, hall_of_fame)
        return self.score_by_family(candidates, desc, hall_of_fame)

    def score_by_family(self, candidates: list[Candidate], desc: str, hall_of_fame: list[dict]) -> dict[str, Evaluation]:
        """Siblings are compared, so a member's offspring go through each stage together; but one
        family's decision reads only its own rows, its member's and the front (fixed during the
        generation), so a family goes on the moment its last sibling is in, with no barrier at a
        stage's end: what it releases (its contenders' next stage, the audits of its stops) joins
        the end of the queue. Behind, not ahead: ahead, the first families' full evaluations ran
        during the others' first stage and the last family's ran alone at the end (the demo's
        four per generation, balanced two by two behind the first stages, left an actor waiting
        a full evaluation; its actors were busy 91% of a generation against 99%)."""
        by_id = {c.id: c for c in candidates}
        waiting: dict[tuple, set[str]] = {}  # (member, stage) -> the ids not yet scored there
        for c in candidates:
            waiting.setdefault((c.target, 0), set()).add(c.id)
        scored: dict[tuple, dict[str, Evaluation]] = {}
        outcome: dict[str, Evaluation] = {}

        def release(row: Evaluation) -> list[ScoreJob]:
            member = by_id[row.id].target if row.id in by_id else None
            key = (member, row.stage)
            if row.id not in waiting.get(key, ()):
                return []  # an audit's row
            waiting[key].discard(row.id)
            scored.setdefault(key, {})[row.id] = row
            if waiting[key]:
                return []
            stage, rows = row.stage, scored[key]
            family = [c for c in candidates if c.id in rows]
            if stage == self.plan.last:
                outcome.update(rows)
                return []
            audits = []
            for cid, decision in self.decisions(stage, rows, family, hall_of_fame).items():
                outcome[cid] = self.stop(rows[cid], stage, *decision)
                if self.judge.audited(cid, decision[2]):  # scored in full anyway, never selected
                    audits.append(self.plan.job(by_id[cid], self.plan.last, member=False))
            going = [c for c in family if c.id not in outcome]
            waiting[(member, stage + 1)] = {g.id for g in going}
            return [self.plan.job(g, stage + 1) for g in going] + audits

        self.scorer.evaluate([self.plan.job(c, 0) for c in candidates], f"{desc}, staged", release=release,
                             may_release=lambda job: job.stage != self.plan.last)
        return {c.id: outcome[c.id] for c in candidates}

    def score_depth_first(self, candidates: list[Candidate], desc: str, hall_of_fame: list[dict]) -> dict[str, Evaluation]:
        """Compress / joint: a candidate's decision needs only the front, fixed during the
        generation, so each candidate runs through its stages in one chain on one actor, which
        applies the (costly) plan once and keeps the compressed model between stages."""
        by_id = {c.id: c for c in candidates}
        stops: dict[str, Evaluation] = {}

        def follow(row: Evaluation) -> ScoreJob | None:
            c, stage = by_id[row.id], row.stage
            if stage == self.plan.last or not row.ok:
                return None
            decision = self.decisions(stage, {c.id: row}, [c], hall_of_fame).get(c.id)
            if decision is None:
                return self.plan.job(c, stage + 1)
            stops[c.id] = self.stop(row, stage, *decision)
            return self.plan.job(c, self.plan.last, member=False) if self.judge.audited(c.id, decision[2]) else None

        last = self.scorer.evaluate([self.plan.job(c, 0) for c in candidates], f"{desc}, staged", follow)
        return {c.id: stops.get(c.id, last[c.id]) for c in candidates}

    def stop(self, row: Evaluation, stage: int, reason: str, rival: str | None, rule: str) -> Evaluation:
        """The candidate's journalled stop (recorded once: a resumed run finds it)."""
        return self.scorer.finished(row.id, "dev", STOPPED) or self.record_stop(row, stage, reason, rival, rule)

    def decisions(self, stage: int, rows: dict, alive: list[Candidate], hall_of_fame: list[dict]) -> dict[str, tuple]:
        # the stage's item ids, which a member's screening examples must cover (`member_row`)
        items = stage_items(rows.values(), self.plan.tasks[stage]) if self.plan.compared_at(stage) else None
        if not self.pareto:
            rivals = {c.target: self.member_row(c.target, stage, items) for c in alive}
            return self.judge.merge_survivors(stage, rows, rivals, alive)
        front = [(self.member_row(m["id"], stage, items), self.costs(m.get("params"), m.get("latency_ms"))) for m in hall_of_fame]
        costs_of = lambda r: self.costs(r.num_params, r.latency_ms)  # noqa: E731
        stopped = self.judge.pareto_survivors(stage, rows, front, alive, costs_of)
        alive = [c for c in alive if c.id not in stopped]
        return {**stopped, **self.judge.pareto_siblings(stage, rows, front, alive, costs_of)}

    def member_row(self, member_id: str, stage: int, items: Mapping[str, set] | None = None) -> Evaluation | None:
        """A member's journalled scores for comparisons at `stage`: its row of that stage when
        the stage is a proxy, else its full dev scores (a superset of every stage's items), at a
        screened stage those it scored in the screening dtype (`screening_examples`; `items`:
        the stage's item ids per task, which they must hold)."""
        if self.plan.tasks[stage] != self.plan.tasks[-1]:
            return self.scorer.finished(member_id, "dev", stage)
        full = self.scorer.finished(member_id, "dev", self.plan.last) or self.scorer.finished(member_id, "dev", None)
        if full is not None and self.plan.compared_at(stage):
            return screening_examples(full, self.plan.tasks[stage], items)
        return full

    def costs(self, params, latency) -> tuple:
        return (float(params or 0),) + ((float(latency or 0),) if self.latency else ())

    def record_stop(self, row: Evaluation, stage: int, reason: str, rival: str | None, rule: str) -> Evaluation:
        stop = stopped_row(row, stage, reason, rival, rule)
        self.scorer.record(stop)
        return stop

    def counts(self, candidates: list[Candidate], outcome: dict[str, Evaluation]) -> dict:
        """Logbook fields: candidates that reached each stage (audits not counted), stopped, audited."""
        def reached(c: Candidate, stage: int) -> bool:
            stop = outcome[c.id]
            return stage <= stop.stage if stop.status == STOPPED else True

        stopped = [c.id for c in candidates if outcome[c.id].status == STOPPED]
        return {
            "judged": len(candidates),
            "reached": [sum(reached(c, k) for c in candidates) for k in range(self.plan.count)],
            "stopped": len(stopped),
            "audited": sum(1 for cid in stopped if self.scorer.finished(cid, "dev", self.plan.last)),
            "score_s": round(sum(e.timing.get("score_s", 0.0) for c in candidates for k in range(self.plan.count)
                                 for e in [self.scorer.finished(c.id, "dev", k)] if e is not None), 3),
        }


def native_bfloat16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AVX-512 BF16 or AMX on x86, the
    BF16 extension on Arm (`/proc/cpuinfo`'s flags or Features). Without it torch emulates them:
    on an AVX2-only AMD EPYC a bfloat16 product took 32x a float32 one and a demo first stage
    20 s instead of about 2 (README, "Screening in bfloat16")."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolved_screen_dtype(config, native_bfloat16: bool | None = None) -> str | None:
    """`fitness.screen_dtype` with `auto` decided for the actors' hardware: on GPUs (where every
    bfloat16 product is native) bfloat16 unless the workers already run in a half precision; on
    CPUs bfloat16 only where `native_bfloat16_cpu` (else the screens run in the workers' dtype)."""
    wanted, workers = config.fitness.screen_dtype, config.workers
    if wanted != "auto":
        return wanted
    if workers.num_gpus > 0:
        return None if workers.dtype in ("auto", "bfloat16") else "bfloat16"
    native = native_bfloat16_cpu() if native_bfloat16 is None else native_bfloat16
    return "bfloat16" if native and workers.dtype != "bfloat16" else None


def stage_plan(config, dev_items: Mapping[str, int]) -> StagePlan:
    """A run's stages (`config.fitness`) over its dev tasks' item counts."""
    fitness = config.fitness
    # A screen in the workers' own dtype is no other precision: its stages run as the last does
    # (a member's screening scores would be a filter of its full ones), so the last stage may join
    # them. With `workers.dtype: auto` the actors decide (bfloat16 on a GPU), so the plan cannot.
    # (`auto` is decided when the run starts: `start_search` writes what it chose.)
    screen = resolved_screen_dtype(config)
    screen = None if screen == config.workers.dtype else screen
    joins = all(kind_class(t.kind).joins_metrics for t in config.tasks)
    return plan_stages(fitness.stages, dev_items, config.seed, fitness.min_items, fitness.proxy is not None,
                       resample=fitness.resample, screen_dtype=screen, generations=config.evolver.generations,
                       joins_last=joins, item_order=fitness.items)


def staged_scoring(config, dev_items: Mapping[str, int], scorer: Scorer, mode) -> StagedScoring:
    """The staged scoring of a run (`config.fitness`), over its dev tasks' item counts."""
    fitness, weights = config.fitness, {t.name: t.weight for t in config.tasks}
    plan = stage_plan(config, dev_items)
    audit_siblings = mode.front_of_all if fitness.audit_siblings is None else fitness.audit_siblings
    judge = StageJudge(plan, weights, fitness.confidence, fitness.advance_per_stage, config.seed, fitness.audit,
                       audit_siblings=audit_siblings, race=fitness.race_per_stage if fitness.race is not None else ())
    return StagedScoring(scorer, plan, judge, pareto=mode.front_of_all, latency=mode.objectives.latency)


__all__ = ["StagePlan", "StageJudge", "StagedScoring", "staged_scoring", "stage_plan", "plan_stages", "examples_of", "weights_for",
           "screening_examples", "stopped_row", "STOPPED"]
