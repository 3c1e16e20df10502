"""Structure search: EvoPress-style (1+λ) evolution of structure genes with staged calibration fitness.

    settings = StructureSearch.model_validate(yaml.safe_load(open("search.yaml")))
    result = run_structure_search(model, calibration, settings, state_path="state.json")
    result.plan      # explicit plan (compression/genes.py compile_plan), replayable with --plan

Fitness. The mean KL(P_dense || P_candidate) of next-token distributions over calibration
windows (EvoPress's choice): no labels, and it measures exactly what compression breaks. The
dense distributions are computed once per pool window and kept as the top `top_k` log-probs
plus the tail mass (KL over k + 1 buckets; merging outcomes never increases a KL, so this is a
lower bound that tightens with k, exact at k = V). Or (`fitness: nll`) the mean next-token
negative log-likelihood of the calibration text itself: the quantity perplexity exponentiates,
so a search for the lowest perplexity selects on what it is judged by (SmolLM2, 8 of 30 blocks
out: the NLL search's set has lower perplexity than every importance ranking's on the test and
held-out texts, the KL search's on held-out text only; README, "Evolved structure").
A candidate is never built: blocks it keeps are replayed one at a time
(`compression.arch.run_block`) on the calibration windows, out blocks are skipped, and a kept
block with width level l > 0 is replaced by its pruned variant, computed once per (layer,
level) with prune_width's own code and statistics (one-shot statistics of the unpruned model,
exactly what the compiled plan's prune_width step does), so the scored model is the model
`--plan` replays on the same statistics windows (tests/test_structure.py). With `stats_windows`
those are the pool's first windows and the stages score on the others (held out from the
reconstruction's regression). Fusion is scored as removal: recovery is
training, run once on the winner by the compiled plan (`recovery: fuse`).

Selection, per generation g (EvoPress's multi-step selection):
    candidates = [parent] + λ offspring, each 1..max_switches level switches of the parent
    windows    = a permutation of the pool drawn from (seed, g); stage s scores the survivors on
                 its first `stages[s].windows` windows and keeps the `stages[s].survivors` best
                 (ties: the earlier candidate, so the parent keeps its place)
    parent     = the last stage's best
The first parent is the best of the importance rankings' gene sets (`init`: Block Influence,
Macro Influence, SLEB, each one-shot on `importance_samples` windows) on the last stage's windows.
Every draw comes from (seed, generation, offspring index) (genes.gene_rng), so a search resumed
from its state file (written atomically after every generation) equals an uninterrupted one.

Cost is counted in forward tokens: calibration tokens pushed through a (partial) model: the
dense reference, the importance scores (Block Influence: one pass; Macro Influence and SLEB: one
pass per block, counted as such) and every candidate scored. An upper bound of the work: the
candidates of one stage share the blocks before their first difference from the parent
(`StructureEvaluator.kls`), so most offspring run only part of the model.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError, model_validator

from compression import arch
from compression.calibration import CalibrationData
from compression.errors import CompressionError, first_validation_error
from compression.genes import (
    FUSE, KEEP, REMOVE, Budget, Genes, PlanKnobs, WidthGrid, budget_for, compile_plan, from_ranking, gene_rng, ridge_field,
    mutate, ranking_prior, uniform_levels,
)
from compression.importance import ImportanceName, importance_fn
from compression.loader import atomic_write_text

NEG_INF = float("-inf")


class SearchSettingsError(CompressionError):
    """A structure-search settings file that cannot work; one line naming the field."""


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    windows: PositiveInt  # calibration windows every candidate reaching this stage is scored on
    survivors: PositiveInt  # how many go on to the next stage (the last stage: 1, the new parent)


ADDED_SETTINGS = ("stats_windows",)  # StructureSearch fields newer than the state files in use
ADDED_KNOBS = ("ridge",)  # PlanKnobs fields newer than them


class StructureSearch(BaseModel):
    """The settings of one structure search (the YAML of `evofuse compress --search`)."""

    model_config = ConfigDict(extra="forbid")

    blocks_out: NonNegativeInt = 0  # blocks taken out (removed, or fused with recovery: fuse)
    width_ratio: NonNegativeFloat = 0.0  # fraction of the kept blocks' FFN+attention params removed
    grid: WidthGrid = WidthGrid()
    knobs: PlanKnobs = PlanKnobs()
    recovery: str = "none"  # none | fuse: out blocks are fused (FuseGPT) in the final plan
    generations: NonNegativeInt = 30
    offspring: PositiveInt = 8  # λ
    stages: list[Stage] = [Stage(windows=2, survivors=2), Stage(windows=8, survivors=1)]
    init: list[ImportanceName] = ["block_influence", "macro_influence", "sleb"]
    importance_samples: PositiveInt = 4  # windows the init rankings are scored on
    prior: ImportanceName | None = None  # ranking that biases which block a mutation takes out
    prior_strength: NonNegativeFloat = 0.5
    max_switches: PositiveInt = 3
    fitness: Literal["kl", "nll"] = "kl"  # KL to the dense model, or the calibration text's own NLL
    # The parent skips the earlier stages and meets their finalists on the last stage's windows,
    # drawn after the earlier stages' windows (none of them reused): a finalist's last-stage loss
    # is then not lowered by having been picked on those windows (the winner's curse), and the
    # parent cannot be knocked out by one stage-1 window. Off: every stage takes a prefix of the
    # generation's windows and the parent runs through every stage like an offspring.
    fresh_final: bool = False
    # Width statistics (the data LIAR's or the greedy reconstruction's regression is fitted on)
    # come from the pool's first `stats_windows` windows, and the stages draw only from the rest:
    # a width level is then judged by how its reconstruction does on text it was not fitted to,
    # not rewarded for fitting the very windows it is scored on. 0: the whole pool is both.
    stats_windows: NonNegativeInt = 0
    top_k: PositiveInt = 256  # dense log-probs kept per position (KL over top_k + 1 buckets)
    batch_size: PositiveInt = 4
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.recovery not in ("none", "fuse"):
            raise ValueError(f"recovery: {self.recovery!r} (valid: none, fuse)")
        if not self.stages:
            raise ValueError("stages: needs at least one stage")
        if self.stages[-1].survivors != 1:
            raise ValueError(f"stages[{len(self.stages) - 1}].survivors: the last stage keeps 1 (the new parent), got {self.stages[-1].survivors}")
        for i in range(1, len(self.stages)):
            if self.stages[i].windows < self.stages[i - 1].windows:
                raise ValueError(f"stages[{i}].windows: {self.stages[i].windows} < the stage before ({self.stages[i - 1].windows})")
        if not self.width_ratio < 1:
            raise ValueError(f"width_ratio: {self.width_ratio} must be < 1")
        if self.blocks_out and not self.init:
            raise ValueError("init: needs at least one importance ranking when blocks_out > 0")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "StructureSearch":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise SearchSettingsError(f"{path}: no such structure-search file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SearchSettingsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise SearchSettingsError(first_validation_error(exc, str(path), unknown_key="unknown key")) from None

    def fingerprint(self) -> str:
        """What a state file must match to be resumed. Settings added since the state format
        stay out of it at their default, so a search started before they existed still resumes."""
        unset: dict = {name: True for name in ADDED_SETTINGS if getattr(self, name) == type(self).model_fields[name].default}
        knobs = {name for name in ADDED_KNOBS if getattr(self.knobs, name) == PlanKnobs.model_fields[name].default}
        if knobs:
            unset["knobs"] = knobs
        return hashlib.sha256(self.model_dump_json(exclude=unset).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the fitness


@dataclass
class DenseReference:
    """Top-k next-token log-probs of the dense model per pool window (float32, CPU)."""

    top_logprobs: torch.Tensor  # (N, T, k)
    top_indices: torch.Tensor  # (N, T, k) long
    tail_logprob: torch.Tensor  # (N, T) log P(every other token)


def top_k_buckets(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Log-probs of the given tokens, then of all the others together.  (..., V), (..., k) -> (..., k+1)"""
    top = logp.gather(-1, indices)
    tail = logp.scatter(-1, indices, NEG_INF).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def bucket_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_b P(b) (log P(b) − log Q(b)) over the last dim, 0 log 0 = 0, in float64.  -> (...)"""
    logp, logq = logp.double(), logq.double()
    terms = logp.exp() * (logp - logq)
    return torch.where(logp > NEG_INF, terms, torch.zeros_like(terms)).sum(-1)


def next_token_nll(logq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log Q(x_{t+1} | x_<=t) at every position that has a next token.  (B, T, V), (B, T) -> (B, T-1)"""
    return -logq[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1).to(logq.device)).squeeze(-1)


class StructureEvaluator:
    """Scores gene sets on calibration windows without building them: the mean per-position KL
    to the dense model (`fitness="kl"`) or next-token NLL of the windows (`"nll"`); lower is better."""

    def __init__(self, model: nn.Module, pool: CalibrationData, grid: WidthGrid, knobs: PlanKnobs,
                 max_level: int = 0, top_k: int = 256, batch_size: int = 4, fitness: str = "kl",
                 stats: CalibrationData | None = None):
        """`pool`: the windows candidates are scored on; `stats`: those the width variants'
        statistics are gathered on (default: the pool)."""
        self.model, self.pool, self.grid, self.batch_size = model.eval(), pool, grid, batch_size
        self.fitness = fitness
        self.blocks = list(arch.decoder_blocks(model))
        self.calls = arch.capture_block_calls(model, pool.seq_len)
        self.tokens = 0  # forward tokens spent so far
        stats = pool if stats is None else stats
        self.variants = width_variants(model, stats, grid, knobs, max_level) if max_level > 0 else {}
        if max_level > 0:
            self.tokens += stats.input_ids.numel()  # the statistics pass
        self.reference = self._dense_reference(top_k) if fitness == "kl" else None

    def _block(self, genes: Genes, i: int) -> nn.Module:
        return self.variants[(i, genes.levels[i])] if genes.levels[i] else self.blocks[i]

    @torch.no_grad()
    def logits(self, genes: Genes, ids: torch.Tensor, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The compiled model's logits (B, T, V) on windows ids (B, T), block by block; from
        block position `start` on when `hidden` (B, T, H) is what enters that position."""
        if hidden is None:
            device, _ = arch.model_device_dtype(self.model)
            hidden = arch.block_input(self.model, ids.to(device))  # (B, T, H)
        for i in genes.kept:
            if i >= start:
                hidden = arch.run_block(self._block(genes, i), self.calls[i], hidden)
        return arch.output_head(self.model, hidden)

    @torch.no_grad()
    def _prefix(self, genes: Genes, ids: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Hidden states (B, T, H) entering block positions 0..depth of the genes' model."""
        device, _ = arch.model_device_dtype(self.model)
        states = [arch.block_input(self.model, ids.to(device))]
        for i in range(depth):
            hidden = states[-1]
            states.append(arch.run_block(self._block(genes, i), self.calls[i], hidden) if genes.blocks[i] == KEEP else hidden)
        return states

    @torch.no_grad()
    def _dense_reference(self, top_k: int) -> DenseReference:
        dense = Genes((KEEP,) * len(self.blocks), (0,) * len(self.blocks))
        tops, idxs, tails = [], [], []
        for start in range(0, self.pool.num_sequences, self.batch_size):
            ids = self.pool.input_ids[start:start + self.batch_size]
            logp = torch.log_softmax(self.logits(dense, ids).float(), dim=-1).cpu()  # (B, T, V)
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            buckets = top_k_buckets(logp, top.indices)
            tops.append(buckets[..., :-1])
            idxs.append(top.indices)
            tails.append(buckets[..., -1])
            self.tokens += ids.numel()
        return DenseReference(torch.cat(tops), torch.cat(idxs), torch.cat(tails))

    def loss(self, genes: Genes, windows: list[int]) -> float:
        """Mean KL(P_dense || P_genes), or NLL, per position over the given pool windows."""
        return self.losses([genes], windows)[0]

    @torch.no_grad()
    def losses(self, candidates: list[Genes], windows: list[int], base: Genes | None = None) -> list[float]:
        """`loss` of every candidate on the same windows. Blocks before the first position where a
        candidate differs from `base` (default: the first candidate) compute what they compute
        for `base`, so each candidate starts from `base`'s hidden state there: an offspring
        mutated at blocks m.. costs only those blocks (the same numbers, fewer block forwards)."""
        base = base if base is not None else candidates[0]
        starts = [first_difference(base, genes) for genes in candidates]
        totals, positions = [0.0] * len(candidates), 0
        for first in range(0, len(windows), self.batch_size):
            rows = torch.tensor(windows[first:first + self.batch_size])
            ids = self.pool.input_ids[rows]  # (B, T)
            prefix = self._prefix(base, ids, max(starts))
            for c, genes in enumerate(candidates):
                logits = self.logits(genes, ids, start=starts[c], hidden=prefix[starts[c]])
                logq = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, V)
                totals[c] += self._position_losses(logq, rows, ids).sum().item()
            positions += ids.numel() if self.fitness == "kl" else ids[:, 1:].numel()
            self.tokens += ids.numel() * len(candidates)
        return [total / positions for total in totals]

    def _position_losses(self, logq: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-position loss of a candidate's log-probs (B, T, V) on pool windows `rows`."""
        if self.fitness == "nll":
            return next_token_nll(logq, ids).double()  # (B, T-1)
        ref = self.reference
        logp = torch.cat([ref.top_logprobs[rows], ref.tail_logprob[rows].unsqueeze(-1)], dim=-1)  # (B, T, k+1)
        return bucket_kl(logp, top_k_buckets(logq, ref.top_indices[rows]))  # (B, T)


def first_difference(a: Genes, b: Genes) -> int:
    """The first block position whose computation differs (kept or not, and its width level);
    the block count when none does. Remove and fuse score alike (fusion is scored as removal)."""
    for i, (x, y) in enumerate(zip(zip(a.blocks, a.levels), zip(b.blocks, b.levels))):
        if (x[0] == KEEP, x[1]) != (y[0] == KEEP, y[1]):
            return i
    return len(a.blocks)


def width_variants(model: nn.Module, calibration: CalibrationData, grid: WidthGrid, knobs: PlanKnobs,
                   max_level: int) -> dict[tuple[int, int], nn.Module]:
    """{(block, level): the block pruned to that level} for levels 1..max_level of every block,
    with prune_width's own statistics pass and per-layer pruning (what its plan step computes)."""
    from compression.width import LayerDims, PruneWidthStep, collect_width_stats, plan_layer, prune_attention, prune_ffn

    blocks = arch.decoder_blocks(model)
    widest = PruneWidthStep(ratio={i: grid.ratio(max_level) for i in range(len(blocks))}, target=grid.target,
                            criterion=knobs.criterion, reconstruct=knobs.reconstruct,
                            **ridge_field(knobs.ridge))
    grams = collect_width_stats(model, widest, calibration)
    variants = {}
    for i, block in enumerate(blocks):
        for level in range(1, max_level + 1):
            step = widest.model_copy(update={"ratio": {i: grid.ratio(level)}})
            cut = plan_layer(grid.ratio(level), grid.target, LayerDims.from_block(block), i)
            pruned = copy.deepcopy(block)
            prune_attention(pruned.self_attn, cut, grams.get(f"{i}.attn"), step)
            prune_ffn(pruned.mlp, cut.ffn_remove, grams.get(f"{i}.ffn"), step)
            variants[(i, level)] = pruned
    return variants


# ------------------------------------------------------------------------------ the search


@dataclass
class SearchResult:
    genes: Genes  # the best gene set found (out blocks as `remove`)
    plan: list[dict]  # compiled, with `recovery` applied
    history: list[dict] = field(default_factory=list)  # one row per generation (0 = the init)
    tokens: int = 0
    seconds: float = 0.0

    def to_data(self) -> dict:
        return {"genes": self.genes.to_data(), "plan": self.plan, "history": self.history,
                "forward_tokens": self.tokens, "seconds": round(self.seconds, 1)}


def windows_for(settings: StructureSearch, generation: int, pool_size: int) -> list[int]:
    """The generation's window order: a seeded permutation of the pool; stage s takes a prefix."""
    order = list(range(pool_size))
    gene_rng(settings.seed, "windows", generation).shuffle(order)
    return order


def final_stage_start(settings: StructureSearch) -> int:
    """Where the last stage's windows begin in the generation's order: 0 (a prefix, like every
    stage), or with `fresh_final` after the longest earlier prefix (stage windows only grow)."""
    return settings.stages[-2].windows if settings.fresh_final and len(settings.stages) > 1 else 0


def stage_windows(settings: StructureSearch, windows: list[int]) -> list[list[int]]:
    """The pool windows each stage scores on: prefixes of the generation's order, the last
    stage's from `final_stage_start`."""
    start = final_stage_start(settings)
    return [windows[:stage.windows] for stage in settings.stages[:-1]] + [windows[start:start + settings.stages[-1].windows]]


def windows_needed(settings: StructureSearch) -> int:
    """How many pool windows a generation's stages read."""
    return final_stage_start(settings) + settings.stages[-1].windows


def select(evaluator: StructureEvaluator, candidates: list[Genes], settings: StructureSearch,
           windows: list[int]) -> tuple[int, float]:
    """Multi-step selection: (index of the winner among candidates, its last-stage loss).
    candidates[0] is the parent; it wins ties (lowest index first)."""
    fresh = final_stage_start(settings) > 0
    alive = list(range(1 if fresh else 0, len(candidates)))
    scores: dict[int, float] = {}
    for number, (stage, chosen) in enumerate(zip(settings.stages, stage_windows(settings, windows))):
        if fresh and number == len(settings.stages) - 1:
            alive = [0, *alive]
        scores = dict(zip(alive, evaluator.losses([candidates[c] for c in alive], chosen, base=candidates[0])))
        alive = sorted(alive, key=lambda c: (scores[c], c))[:stage.survivors]
    return alive[0], scores[alive[0]]


def offspring_of(parent: Genes, settings: StructureSearch, generation: int, prior) -> list[Genes]:
    """λ distinct mutants of the parent (a few redraws when a mutant repeats one)."""
    children: list[Genes] = []
    for k in range(settings.offspring):
        rng = gene_rng(settings.seed, "offspring", generation, k)
        child = mutate(parent, rng, settings.grid, settings.max_switches, prior)
        for _ in range(8):
            if child != parent and child not in children:
                break
            child = mutate(parent, rng, settings.grid, settings.max_switches, prior)
        children.append(child)
    return children


def importance_rankings(model: nn.Module, calibration: CalibrationData, settings: StructureSearch) -> tuple[dict[str, list[float]], int]:
    """{criterion: per-block scores} for `init` and `prior`, and the forward tokens they cost."""
    scoring = calibration.take(settings.importance_samples)
    names = list(dict.fromkeys([*settings.init, *([settings.prior] if settings.prior else [])]))
    n, tokens, rankings = len(arch.decoder_blocks(model)), scoring.input_ids.numel(), {}
    for name in names:
        rankings[name] = importance_fn(name)(model, scoring, batch_size=settings.batch_size)
        tokens += scoring.input_ids.numel() * (1 if name == "block_influence" else n)  # n skip-one passes
    return rankings, tokens


def initial_candidates(rankings: dict[str, list[float]], budget: Budget, settings: StructureSearch, n: int) -> dict[str, Genes]:
    if budget.blocks_out == 0:
        return {"uniform": Genes((KEEP,) * n, tuple(uniform_levels(list(range(n)), n, budget.width_units)))}
    return {name: from_ranking(rankings[name], budget) for name in settings.init}


def with_recovery(genes: Genes, recovery: str) -> Genes:
    if recovery != "fuse":
        return genes
    return Genes(tuple(FUSE if a == REMOVE else a for a in genes.blocks), genes.levels)


def _load_state(path: Path | None, fingerprint: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SearchSettingsError(f"{path}: not a structure-search state file (invalid JSON)") from None
    if state.get("fingerprint") != fingerprint:
        raise SearchSettingsError(f"{path}: written by a search with other settings (remove it to start over)")
    return state


def split_pool(calibration: CalibrationData, settings: StructureSearch) -> tuple[CalibrationData, CalibrationData]:
    """(the windows width statistics are gathered on, the windows the stages score on)."""
    if not settings.stats_windows:
        return calibration, calibration
    if settings.stats_windows >= calibration.num_sequences:
        raise SearchSettingsError(f"stats_windows: {settings.stats_windows} leaves none of the "
                                  f"{calibration.num_sequences} calibration windows to score on")
    return calibration.split(settings.stats_windows)


def run_structure_search(model: nn.Module, calibration: CalibrationData, settings: StructureSearch,
                         state_path: str | Path | None = None, log: Callable[[str], None] | None = None,
                         stop_after: int | None = None, rankings: dict[str, list[float]] | None = None) -> SearchResult:
    """Evolve the structure of `model` on `calibration` (the pool of windows every stage draws
    from, less the first `stats_windows`, which only the width statistics read). `state_path`:
    journal, resumed when present. `stop_after`: end after that generation (as if killed; for tests). `rankings`: precomputed importance scores (the benchmark shares
    them with its baselines)."""
    started = time.perf_counter()
    n = arch.num_blocks(model)
    budget = budget_for(n, settings.blocks_out, settings.width_ratio, settings.grid)
    needed = windows_needed(settings)
    stats, calibration = split_pool(calibration, settings)
    if calibration.num_sequences < needed:
        beyond = f" beyond the {settings.stats_windows} stats_windows" if settings.stats_windows else ""
        raise SearchSettingsError(f"stages[{len(settings.stages) - 1}].windows: the stages need {needed} windows, "
                                  f"more than the {calibration.num_sequences} calibration windows{beyond}")
    path = Path(state_path) if state_path is not None else None
    fingerprint = settings.fingerprint()
    state = _load_state(path, fingerprint)
    extra_tokens = 0
    if rankings is None and (settings.blocks_out or settings.prior) and (state is None or settings.prior):
        rankings, extra_tokens = importance_rankings(model, calibration, settings)
    evaluator = StructureEvaluator(model, calibration, settings.grid, settings.knobs,
                                   max_level=settings.grid.max_level if budget.width_units else 0,
                                   top_k=settings.top_k, batch_size=settings.batch_size, fitness=settings.fitness,
                                   stats=stats)
    prior = ranking_prior(rankings[settings.prior], settings.prior_strength) if settings.prior else None
    if state is None:
        evaluator.tokens += extra_tokens
        inits = initial_candidates(rankings or {}, budget, settings, n)
        windows = windows_for(settings, 0, calibration.num_sequences)[:needed]
        losses = dict(zip(inits, evaluator.losses(list(inits.values()), windows)))
        best = min(losses, key=lambda name: (losses[name], list(inits).index(name)))
        state = {"fingerprint": fingerprint, "fitness": settings.fitness, "generation": 0, "parent": inits[best].to_data(),
                 "history": [{"generation": 0, "loss": losses[best], "from": best, "init_loss": losses}],
                 "tokens": evaluator.tokens, "seconds": time.perf_counter() - started}
        _save_state(path, state)
        if log:
            log(f"structure search: start from {best} ({settings.fitness} {losses[best]:.4f}; "
                f"{', '.join(f'{k} {v:.4f}' for k, v in losses.items())})")
    else:
        evaluator.tokens = 0
    parent = Genes.from_data(state["parent"])
    tokens_before, seconds_before = state["tokens"], state["seconds"] - (time.perf_counter() - started)
    for generation in range(state["generation"] + 1, settings.generations + 1):
        candidates = [parent, *offspring_of(parent, settings, generation, prior)]
        winner, loss = select(evaluator, candidates, settings, windows_for(settings, generation, calibration.num_sequences))
        parent = candidates[winner]
        state["history"].append({"generation": generation, "loss": loss, "replaced": winner != 0, "out": parent.out})
        state.update(generation=generation, parent=parent.to_data(), tokens=tokens_before + evaluator.tokens,
                     seconds=seconds_before + time.perf_counter() - started)
        _save_state(path, state)
        if log:
            log(f"generation {generation}/{settings.generations}: {settings.fitness} {loss:.4f}{' (new parent)' if winner else ''}")
        if stop_after is not None and generation >= stop_after:
            break
    final = with_recovery(parent, settings.recovery)
    return SearchResult(parent, compile_plan(final, settings.grid, settings.knobs), state["history"],
                        state["tokens"], state["seconds"])


def _save_state(path: Path | None, state: dict) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(state, indent=1))


__all__ = [
    "DenseReference", "SearchResult", "SearchSettingsError", "Stage", "StructureEvaluator", "StructureSearch",
    "bucket_kl", "first_difference", "run_structure_search", "split_pool", "top_k_buckets", "width_variants",
]
