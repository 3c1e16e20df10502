"""Run configuration: pydantic models loaded from YAML.

Every model forbids unknown keys, so a typo is an error naming its field rather than a
silently ignored option. `load_config` turns any problem into one `ConfigError` line:
`tasks[1].dev: no such file 'data/dev.jsonl'`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import Field, field_validator, model_validator

from compression.calibration import DataSpecError

from search.errors import ConfigError
from search.schema import Strict, beside_config, read_yaml, validate
from search.preflight import preflight
from search.tuning.space import SpaceConfig




class FineTune(Strict):
    """A short fine-tune that turns a source into an expert (LoRA merged back, or full)."""

    data: str  # training data: a built-in split (pydoc:train, arithmetic:train) or a file
    steps: int = Field(60, ge=1)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8)
    lora_rank: int = Field(16, ge=0)  # 0: train every weight matrix directly
    lora_alpha: float = Field(32.0, gt=0)
    seed: int = 0


class ParentSpec(Strict):
    name: str
    source: str  # HF directory, built-in name, or the name of another parent (fine-tuned from it)
    finetune: Optional[FineTune] = None

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("use letters, digits, '_', '.', '-' only")
        return value


class Parents(Strict):
    base: ParentSpec
    experts: list[ParentSpec] = Field(default_factory=list)  # 2+ unless the run only compresses

    @model_validator(mode="after")
    def _unique(self) -> "Parents":
        names = [self.base.name] + [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"parent names must be unique, repeated: {', '.join(dupes)}")
        return self

    def all(self) -> list[ParentSpec]:
        return [self.base, *self.experts]


class TaskConfig(Strict):
    name: str
    kind: Literal["perplexity", "multiple_choice", "generate", "lm_eval"]
    dev: str
    test: str
    weight: float = Field(1.0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class SeedMerge(Strict):
    """An extra initial member made by a classic merge (mergekit-style parameters), or by a
    recipe evolved before (`recipe`: a recipe run's directory, one of its exports, a recipe JSON
    file, or the recipe mapping itself; README, "Evolving the recipe")."""

    name: str
    op: Optional[str] = None  # a registered method: linear, task_arithmetic, ties, dare_ties, slerp, ...
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: Optional[list[str]] = None  # parents merged (default: the experts); the base is the base
    # A path is read once when the config is loaded and replaced by the recipe it holds, so the
    # run's config.yaml carries the recipe itself (search.tuning.recipe_space.read_seed_recipe).
    recipe: Optional[str | dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_source(self) -> "SeedMerge":
        if (self.op is None) == (self.recipe is None):
            raise ValueError("give either 'op' (a classic merge) or 'recipe' (an evolved recipe), not both or neither")
        if self.recipe is not None and (self.params or self.inputs):
            raise ValueError("'params' and 'inputs' belong to an 'op' seed; a 'recipe' seed carries its own")
        return self


class EvolverConfig(Strict):
    # A value, or a range [lo, hi] drawn per offspring, stratified over a member's siblings
    # (evolve.evolver.step_size): with several offspring per member, siblings then differ in how
    # far they step toward their reference, not only in their crossover masks.
    F: float | tuple[float, float] = 0.5
    CR: float | tuple[float, float] = 0.5
    generations: int = Field(15, ge=0)
    strategy: Literal["evolver", "de_rand_1"] = "evolver"
    # How the mutation picks x_ref: the paper's code uses "schedule", a random other member with
    # probability p = 0.5 / (generations - g) + 0.5, else the best other member.
    reference: Literal["schedule", "random", "best"] = "schedule"
    exclude: list[str] = Field(default_factory=list)  # tensor-name patterns (fnmatch) never evolved
    include_base: bool = False  # put the base model in the population too
    # Dev-set subsampling per generation (rows or fraction); 0/None scores the full dev sets.
    subsample: Optional[float] = Field(None, gt=0)
    seeds: list[SeedMerge] = Field(default_factory=list)  # classic merges added to the population
    # EvoPress's (1 + lambda): offspring per member and generation; with staged fitness all are
    # judged on the first stage and the best `fitness.advance` of each member's go on.
    offspring_per_member: int = Field(1, ge=1)
    # Joint runs: a member's offspring share one Evolver recipe and differ in their plans, so the
    # work a recipe needs before any plan (its dense KL reference, its width statistics) is done
    # once per recipe instead of once per candidate.
    share_recipe: bool = False
    # The paper's "merge the population" mode: after each generation, this merge of the whole
    # population is scored too (a hall-of-fame candidate, never a population member).
    merge_population: Optional[str] = None
    merge_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("F", "CR", mode="before")
    @classmethod
    def _step_size(cls, value, info):
        top = 2.0 if info.field_name == "F" else 1.0
        is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if is_number(value):
            values = (float(value),)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_number, value)):
            values = tuple(float(v) for v in value)
        else:
            raise ValueError(f"must be a number or a range [lo, hi], got {value!r}")
        if not all(0.0 <= v <= top for v in values):
            raise ValueError(f"must lie in [0, {top:g}], got {value}")
        if values[0] > values[-1]:
            raise ValueError(f"a range [lo, hi] needs lo <= hi, got {list(values)}")
        return values[0] if len(values) == 1 else values


class ProxyTask(Strict):
    """A cheap first-stage task for compress / joint runs, e.g. the `kl` task on calibration text."""

    kind: Literal["kl", "perplexity"] = "kl"
    data: str = "pydoc:train"
    options: dict[str, Any] = Field(default_factory=dict)
    # Judge the plan here without its width reconstruction (LIAR / greedy: units chosen by the
    # step's criterion, weights left as they are); a candidate that goes on is rebuilt with it.
    unreconstructed: bool = False


class FitnessConfig(Strict):
    """Staged fitness (README, "Staged fitness"): every candidate is scored first on a seeded
    subset of each dev task (the same items for every candidate of a generation, and members
    are scored on every item, so comparisons are paired) and goes on to the next stage only
    while it can still win. `stages: [1.0]` scores everything at once (no stages)."""

    stages: list[float] = Field(default_factory=lambda: [1.0])
    confidence: float = Field(0.9, gt=0.5, lt=1)
    min_items: int = Field(4, ge=1)  # each task's first stage scores at least this many items
    # Offspring per member that go on past each stage but the last: one number for every stage,
    # or one per stage (non-increasing, e.g. [3, 1]: EvoPress's multi-step selection, the best
    # three of a member's offspring meet a larger subset and the best of those the full dev sets).
    advance: int | list[int] = 1
    # Merge runs with siblings: a race among each member's offspring after a stage (one confidence
    # for every stage but the last, or one per stage, null for none), as racing algorithms pick the
    # best of many configurations. A sibling goes on unless the paired test at that confidence
    # puts it behind the stage's leader (its best sibling there); `advance` then caps how many go
    # on. E.g. {race: [0.9, 0.75], advance: [24, 3]} (README, "Races among siblings").
    race: Optional[float | list[Optional[float]]] = None
    audit: float = Field(0.0, ge=0, le=1)  # fraction of stopped candidates fully scored anyway
    # Whether the audit also draws from sibling stops (a better-ranked offspring of the same
    # member went on); default: in compress / joint runs, not in merge runs (there they are most
    # stops: search.run.stages.StageJudge.audited).
    audit_siblings: Optional[bool] = None
    # A fresh draw of the subsets per generation (search.run.stages.StagePlan.indices says why);
    # false: one draw for the whole run.
    resample: bool = True
    proxy: Optional[ProxyTask] = None  # compress / joint: the first stage scores this task instead
    # Screening precision: the stages before the last run their matrix products in this dtype
    # (torch autocast; the working model's weights stay as they are), the last stage at the
    # workers' dtype. On a CPU with AVX-512 BF16 a bfloat16 stage costs about half of a
    # float32 one; each candidate scored in full also scores, in this dtype, the screening items
    # it will be compared on as a member, so screening comparisons never mix precisions
    # (README, "Screening in bfloat16"). `auto`: bfloat16 where the actors' hardware multiplies
    # it (a GPU, a CPU with AVX-512 BF16 or AMX), else none; decided when the run starts and
    # written into its config, so a resume elsewhere screens as the run began.
    screen_dtype: Optional[Literal["auto", "bfloat16", "float16"]] = None
    # Stage items chosen, not drawn (README, "Stage items where siblings disagree"): {dev task:
    # item positions, most useful first} (search.fitness.items), or a JSON file of one, read when
    # the config loads (relative to the config) so the run's own config.yaml carries the order.
    # Stage k takes each task's first items of the order, the same every generation.
    items: Optional[str | dict[str, list[int]]] = None

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: list[float]) -> list[float]:
        if not stages or any(not 0 < f <= 1 for f in stages) or stages[-1] != 1.0 or sorted(set(stages)) != stages:
            raise ValueError(f"must increase within (0, 1] and end at 1.0, got {stages}")
        return stages

    @field_validator("advance")
    @classmethod
    def _advance(cls, advance: int | list[int]) -> int | list[int]:
        counts = [advance] if isinstance(advance, int) else advance
        if not counts or any(n < 1 for n in counts) or any(a < b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"must be a positive number, or one per stage before the last, non-increasing; got {advance}")
        return advance

    @field_validator("race")
    @classmethod
    def _race(cls, race: float | list[float | None] | None) -> float | list[float | None] | None:
        levels = race if isinstance(race, list) else [race]
        if any(c is not None and not 0.5 < c < 1 for c in levels) or race == []:
            raise ValueError(f"must be a confidence in (0.5, 1), or one (or null) per stage before the last; got {race}")
        return race

    @model_validator(mode="after")
    def _advance_per_stage(self) -> "FitnessConfig":
        for name in ("advance", "race"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.stages_before_last:
                raise ValueError(f"{name}: {len(value)} values for {self.stages_before_last} stages before the last "
                                 f"(stages {self.stages}{', after the proxy' if self.proxy else ''})")
        return self

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1 or self.proxy is not None

    @property
    def stages_before_last(self) -> int:
        """The stages a candidate can be stopped after: the dev stages but the last, and the proxy."""
        return len(self.stages) - 1 + (self.proxy is not None)

    @property
    def advance_per_stage(self) -> tuple[int, ...]:
        """How many of a member's offspring go on past each stage but the last."""
        return tuple(self.advance) if isinstance(self.advance, list) else (self.advance,) * self.stages_before_last

    @property
    def race_per_stage(self) -> tuple[float | None, ...]:
        """The race's confidence after each stage but the last (None: no race there)."""
        return tuple(self.race) if isinstance(self.race, list) else (self.race,) * self.stages_before_last


class RecipeSearchConfig(Strict):
    """`mode: recipe` (README, "Evolving the recipe"): Optuna proposes per-layer-group values of
    one merge method's numeric parameters over the experts; each proposal is a recipe scored like
    any candidate. A parameter's `layer_groups` values are anchors of a mergekit gradient,
    interpolated over the decoder layers (search.tuning.recipe_space)."""

    method: str  # a registered merge method (evolve/registry.py) with numeric parameters
    layer_groups: int = Field(1, ge=1, le=64)  # values per searched parameter, spread over depth
    parameters: dict[str, list[float]] = Field(min_length=1)  # searched parameter -> [low, high]
    fixed: dict[str, Any] = Field(default_factory=dict)  # the method's other parameters, as given
    per_expert: bool = True  # per-input parameters (weight, density, ...) get a value per expert
    inputs: Optional[list[str]] = None  # parents merged (default: the experts)
    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    # Trials asked (and scored) per generation; default CMA-ES's population 4 + floor(3 ln n)
    # for n searched values.
    trials_per_generation: Optional[int] = Field(None, ge=1)
    sigma: float = Field(1 / 6, gt=0, le=1)  # CMA-ES's first step size, as a fraction of each range

    @field_validator("parameters")
    @classmethod
    def _ranges(cls, parameters: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, bounds in parameters.items():
            if len(bounds) != 2 or not all(map(math.isfinite, bounds)) or not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: expected [low, high] with low < high, got {bounds}")
        return parameters


class WorkersConfig(Strict):
    count: int = Field(1, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    address: Optional[str] = None  # join an existing Ray cluster; default: start a local one
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    max_retries: int = Field(2, ge=0)
    # With evolver.share_recipe: how many GiB of a recipe's whole width statistics (every pruned
    # layer's input Gram matrices, which its plans' reconstructions read) an actor may keep for
    # the recipe's next rebuilt plan. Beyond it each rebuilt plan gathers its own, block by block:
    # the same bytes, one calibration pass more per rebuild. Default: the working model's size.
    recipe_stats_gib: Optional[float] = Field(None, ge=0)


class LatencyConfig(Strict):
    """A third objective: the compressed candidate's measured forward time (minimised).

    Median over `repeats` timed forward passes (after `warmup` untimed ones) of a fixed batch of
    `batch_size` x `seq_len` token ids, no KV cache, on the worker's device. Wall-clock time on
    shared machines is noisy: use more repeats there, or leave latency out and use parameters.
    """

    batch_size: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(1, ge=0)


class CompressConfig(Strict):
    """Plans for `compress` and `joint` runs: the space Optuna searches and the budget."""

    space: SpaceConfig = Field(default_factory=SpaceConfig)
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    candidates: int = Field(4, ge=1)  # compress mode: trials asked per generation
    weights: Optional[str] = None  # compress mode: the parent whose weights are compressed (default: base)
    # Size budget: a parameter count, or a fraction of the dense model when <= 1. With NSGA-II /
    # TPE it is a constraint; DEAP's selection ranks over-budget candidates below all others.
    max_params: Optional[float] = Field(None, gt=0)
    # With a budget: the first generation's plans are anchors sized to it (search/space.py),
    # not random draws.
    budget_anchors: bool = True
    latency: Optional[LatencyConfig] = None  # measure and minimise latency too (three objectives)


class RunConfig(Strict):
    name: str
    seed: int = 0
    run_dir: Optional[str] = None
    # merge: Evolver on weights only; compress: Optuna over plans for fixed weights;
    # joint: each candidate is an Evolver recipe plus a plan from Optuna;
    # recipe: Optuna searches a merge method's per-layer-group parameters (the `recipe` section).
    mode: Literal["merge", "compress", "joint", "recipe"] = "merge"
    parents: Parents
    tasks: list[TaskConfig] = Field(min_length=1)
    evolver: EvolverConfig = Field(default_factory=EvolverConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    recipe: Optional[RecipeSearchConfig] = None  # mode: recipe
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    export_top: int = Field(1, ge=0)  # candidates exported when the run finishes

    @property
    def sized(self) -> bool:
        """Compress and joint runs: candidates carry plans, so their size is an objective."""
        return self.mode in ("compress", "joint")

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        # the name is a directory under runs/: one plain path component, never '..' or absolute
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or ".." in value:
            raise ValueError(f"{value!r} is not a run name (letters, digits, '_', '.', '-'; starting with a letter or digit)")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> "RunConfig":
        if self.mode != "compress" and len(self.parents.experts) < 2:
            raise ValueError(f"parents.experts: {self.mode} runs need at least 2 experts, got {len(self.parents.experts)}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        if self.fitness.staged and self.evolver.subsample:
            raise ValueError("evolver.subsample: use fitness.stages instead (they cannot be combined)")
        if self.fitness.screen_dtype and not self.fitness.staged:
            raise ValueError("fitness.screen_dtype: screens the stages before the last; this run has one stage (no fitness.stages before 1.0, no proxy)")
        if self.fitness.items is not None and not self.fitness.staged:
            raise ValueError("fitness.items: chooses the items of the stages before the last; this run has one stage (no fitness.stages before 1.0)")
        if isinstance(self.fitness.items, dict):
            _order_fits_tasks(self.fitness.items, names)
        if self.fitness.staged and any(t.kind == "lm_eval" for t in self.tasks):
            raise ValueError("fitness.stages: lm_eval tasks give no per-example scores to stage on")
        if self.evolver.share_recipe and self.mode != "joint":
            raise ValueError(f"evolver.share_recipe: for joint runs (offspring sharing a recipe differ only in their plans; this run's mode is {self.mode})")
        if self.workers.recipe_stats_gib is not None and not self.evolver.share_recipe:
            raise ValueError("workers.recipe_stats_gib: bounds what an actor keeps of a shared recipe; this run shares none (evolver.share_recipe)")
        if self.fitness.race is not None and self.mode not in ("merge", "recipe"):
            raise ValueError(f"fitness.race: races siblings by stage score, for merge runs (a {self.mode} run's siblings differ "
                             f"in size and are ranked by their lead over the front)")
        if self.fitness.race is not None and not self.fitness.staged:
            raise ValueError("fitness.race: races siblings after the stages before the last; this run has one stage")
        if self.fitness.proxy is not None and self.mode in ("merge", "recipe"):
            raise ValueError("fitness.proxy: a proxy first stage is for compress / joint runs (merge candidates have no plan)")
        parents = [p.name for p in self.parents.all()]
        if self.compress.weights is not None and self.compress.weights not in parents:
            raise ValueError(f"compress.weights: {self.compress.weights!r} is not a parent ({', '.join(parents)})")
        for i, seed in enumerate(self.evolver.seeds):
            if seed.name in parents:
                raise ValueError(f"evolver.seeds[{i}].name: {seed.name!r} is already a parent's name")
            unknown = [n for n in seed.inputs or [] if n not in parents]
            if unknown:
                raise ValueError(f"evolver.seeds[{i}].inputs: {unknown[0]!r} is not a parent")
            if not isinstance(seed.recipe, str):  # a path is read by check_data, then checked
                _check_recipe(seed_recipe(self, seed), f"evolver.seeds[{i}]")
        self._check_recipe_search(parents)
        if self.evolver.merge_population:
            try:
                population_merge_recipe(self, [e.name for e in self.parents.experts], 0)
            except ValueError as exc:
                raise ValueError(f"evolver.merge_population: {exc}") from None
        return self

    def _check_recipe_search(self, parents: list[str]) -> None:
        if self.mode != "recipe":
            if self.recipe is not None:
                raise ValueError(f"recipe: only for mode: recipe (this run's mode is {self.mode})")
            return
        if self.recipe is None:
            raise ValueError("recipe: mode: recipe needs a recipe section (method, parameters, ...)")
        unknown = [n for n in self.recipe.inputs or [] if n not in parents]
        if unknown:
            raise ValueError(f"recipe.inputs: {unknown[0]!r} is not a parent")
        if self.evolver.merge_population:
            raise ValueError("evolver.merge_population: not for recipe runs (their members' weights are not stored)")
        if self.evolver.offspring_per_member != 1:
            raise ValueError("evolver.offspring_per_member: recipe runs ask recipe.trials_per_generation trials instead")
        if self.recipe.sampler == "cmaes" and self.recipe.trials_per_generation == 1:
            raise ValueError("recipe.trials_per_generation: CMA-ES needs at least 2 trials per generation")
        from search.tuning.recipe_space import RecipeSpace, RecipeSpaceError

        try:
            RecipeSpace.from_config(self, num_layers=max(2, self.recipe.layer_groups)).check()
        except RecipeSpaceError as exc:
            raise ValueError(str(exc)) from None

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they are written or who runs them)."""
        return identity_hash(self.model_dump(mode="json"))


# Where a run's results are written and who computes them (how many actors, on which cluster,
# keeping how much memory) change no result, so they are not part of a run's identity.
NOT_IDENTITY = {"run_dir": True, "workers": {"address", "count", "recipe_stats_gib"}}


def identity_part(dumped: dict) -> dict:
    """A config's JSON dump less the fields that are not part of a run's identity."""
    data = {k: v for k, v in dumped.items() if NOT_IDENTITY.get(k) is not True}
    for section, names in NOT_IDENTITY.items():
        if names is not True and isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in names}
    return data


def identity_hash(dumped: dict) -> str:
    """The fingerprint of a config's JSON dump: a 16-hex sha256 prefix of its identity part."""
    return hashlib.sha256(json.dumps(identity_part(dumped), sort_keys=True).encode()).hexdigest()[:16]


def seed_recipe(config: "RunConfig", seed: SeedMerge):
    from evolve.recipe import Recipe, derive_seed

    if isinstance(seed.recipe, dict):  # an evolved recipe, replayed as it was (its own seed)
        return Recipe.from_dict(seed.recipe)
    inputs = tuple(seed.inputs or [e.name for e in config.parents.experts])
    return Recipe(op=seed.op, inputs=inputs, params=dict(seed.params), seed=derive_seed(config.seed, seed.name), base=config.parents.base.name)


def population_merge_recipe(config: "RunConfig", member_ids: list[str], generation: int):
    from evolve.population import population_merge_recipe as merge_recipe
    from evolve.recipe import derive_seed

    return merge_recipe(
        member_ids, config.evolver.merge_population, base=config.parents.base.name,
        params=config.evolver.merge_params, seed=derive_seed(config.seed, "merge", generation),
    )


def _check_recipe(recipe, where: str) -> None:
    from evolve.registry import validate_recipe
    from evolve.recipe import RecipeError

    try:
        validate_recipe(recipe)
    except RecipeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """A copy of the parsed config `raw` with each `KEY=VALUE` of `overrides` set, in order.

    KEY is a dotted path into the document: `evolver.generations`, `fitness.proxy.options.top_k`,
    `tasks.0.options.subsample` (a number indexes a list). VALUE is read as YAML, so `3`, `0.5`,
    `[0.1, 0.9]`, `true` and `null` are what they look like and anything else is a string. A
    missing mapping on the way is created; the schema then refuses a key it does not know, as it
    would in the file."""
    if not overrides or not isinstance(raw, dict):
        return raw  # nothing to set, or a document `validate` refuses as a whole
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth]) or "the config"
            if isinstance(node, list):
                slot: Any = list_index(node, part, parent, key)
            elif isinstance(node, dict):
                slot = part
                if depth < len(parts) - 1 and node.get(part) is None:
                    node[part] = {}
            else:
                raise ConfigError(f"--set {key}: {parent} is {node!r}, not a mapping")
            if depth == len(parts) - 1:
                node[slot] = value
            else:
                node = node[slot]
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. evolver.generations=3")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None


def list_index(node: list, part: str, where: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {where} is a list of {len(node)}; index it by 0..{len(node) - 1}, got {part!r}")
    return int(part)


def parse_config(raw: Any, origin: str = "config") -> RunConfig:
    return validate(RunConfig, raw, origin, ConfigError)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config in `path`, with `overrides` (`KEY=VALUE`, `evofuse search --set`) applied
    before it is checked, so a bad override is refused like a bad line of the file."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path, ConfigError), overrides)
    config = parse_config(raw, f"{path} with --set" if overrides else str(path))
    check_data(config, base_dir=path.parent)
    preflight(config, base_dir=path.parent)  # dev and test distinct, the plan space fits the architecture
    return config


def check_data(config: RunConfig, base_dir: Path | None = None) -> None:
    """Every data spec names a built-in split or an existing file (paths may be relative to the config)."""
    from search.models.datasets import builtin_name

    def check(spec: str, where: str) -> str:
        try:
            if builtin_name(spec) is not None or spec.startswith("pydoc:"):
                return spec
        except DataSpecError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        path = beside_config(spec, base_dir)
        if not path.is_file():
            raise ConfigError(f"{where}: no such file {spec!r}")
        return str(path)

    check_seed_recipes(config, base_dir)
    check_item_order(config, base_dir)
    for i, task in enumerate(config.tasks):
        if task.kind == "lm_eval":
            continue
        task.dev = check(task.dev, f"tasks[{i}].dev")
        task.test = check(task.test, f"tasks[{i}].test")
    from search.models.sources import BUILTINS, SourceError, resolve_source

    earlier: list[str] = []
    for i, parent in enumerate(config.parents.all()):
        where = "parents.base" if i == 0 else f"parents.experts[{i - 1}]"
        if parent.source not in BUILTINS and parent.source not in earlier:
            path = beside_config(parent.source, base_dir, Path.is_dir)
            if not path.is_dir():
                raise ConfigError(
                    f"{where}.source: {parent.source!r} is not a directory, a built-in ({', '.join(BUILTINS)}) "
                    f"or an earlier parent"
                )
            try:  # config.json, safetensors headers, no code of its own (search.models.sources)
                resolve_source(path)
            except SourceError as exc:
                raise ConfigError(f"{where}.source: {exc}") from None
            parent.source = str(path)
        if parent.finetune is not None:
            parent.finetune.data = check(parent.finetune.data, f"{where}.finetune.data")
        earlier.append(parent.name)


def _order_fits_tasks(items: dict[str, list[int]], tasks: list[str]) -> None:
    """`fitness.items` names every task once and holds distinct positions >= 0."""
    from search.fitness.items import checked_order

    checked_order(items, "fitness.items")
    unknown = [t for t in items if t not in tasks]
    if unknown:
        raise ValueError(f"fitness.items: {unknown[0]!r} is not a task of this run ({', '.join(tasks)})")
    missing = [t for t in tasks if t not in items]
    if missing:
        raise ValueError(f"fitness.items: no item order for task {missing[0]!r} (every dev task needs one)")


def check_item_order(config: RunConfig, base_dir: Path | None = None) -> None:
    """A `fitness.items` path read into the order it holds (relative to the config), then checked
    against the run's tasks."""
    from search.fitness.items import read_item_order

    items = config.fitness.items
    if not isinstance(items, str):
        return
    try:
        order = read_item_order(items, base_dir)
        _order_fits_tasks(order, [t.name for t in config.tasks])
    except ValueError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("fitness.items") else f"fitness.items: {message}") from None
    config.fitness.items = order


def check_seed_recipes(config: RunConfig, base_dir: Path | None = None) -> None:
    """Every `evolver.seeds[i].recipe` path (a recipe run, an export, a JSON file; relative to
    the config) read into the recipe it names and checked against this run's parents."""
    from search.tuning.recipe_space import RecipeSpaceError, read_seed_recipe

    parents = [p.name for p in config.parents.all()]
    for i, seed in enumerate(config.evolver.seeds):
        where = f"evolver.seeds[{i}].recipe"
        try:
            if isinstance(seed.recipe, str):
                seed.recipe = read_seed_recipe(seed.recipe, base_dir)
            if isinstance(seed.recipe, dict):
                recipe = seed_recipe(config, seed)
                outside = [i for i in recipe.input_ids() if i not in parents]
                if outside:
                    raise RecipeSpaceError(
                        f"reads {outside[0]!r}, not a parent of this run ({', '.join(parents)}); only recipes over the "
                        "parents can seed (use an export as a parent's source instead)")
                _check_recipe(recipe, where)
        except (RecipeSpaceError, ValueError) as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def check_tasks(config: RunConfig) -> None:
    """Build every task's dev and test set once, before anything runs or is written: the same
    loading and option checks a worker makes, with a stand-in byte tokenizer
    (search.models.tiny). A malformed line, a missing field, a label out of range, an empty set
    or document, non-UTF-8 bytes, a JSON array, an unknown or mistyped option: one ConfigError
    naming the field (`tasks[1].dev: data/dev.jsonl:3: not JSON ...`)."""
    from search.errors import BAD_INPUT, one_line
    from search.fitness import TaskSpec, build_task
    from search.fitness.lm_eval import parse_lm_eval_data
    from search.fitness.spec import check_options

    tokenizer = None
    for i, task in enumerate(config.tasks):
        for split in ("dev", "test"):
            spec = TaskSpec(kind=task.kind, data=getattr(task, split), name=task.name, options=task.options)
            where = f"tasks[{i}].{split}"
            try:
                check_options(spec)
                if task.kind == "lm_eval":  # lm-eval reads its own YAML; the workers build it
                    parse_lm_eval_data(spec.data, task.options.get("include_path"))
                    continue
                if tokenizer is None:
                    from search.models.tiny import byte_tokenizer

                    tokenizer = byte_tokenizer()
                built = build_task(spec, tokenizer)
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{where}: {spec.data}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
            except BAD_INPUT as exc:
                message = one_line(exc)
                field = f"tasks[{i}].options" if "option" in message and "row" not in message else where
                raise ConfigError(f"{field}: {message}") from None
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as exc:
                raise ConfigError(f"{where}: {spec.data}: cannot be read as {task.kind} data ({type(exc).__name__}: {one_line(exc)})") from None
            if task.kind == "perplexity":
                empty = next((n for n, doc in enumerate(built.documents, 1) if not doc.strip()), None)
                if empty is not None:
                    what = f'row {empty}: empty "text"' if str(spec.data).endswith(".jsonl") else "is empty"
                    raise ConfigError(f"{where}: {spec.data}: {what} (a perplexity set needs text to score)")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
