"""Structure genes: which blocks stay and how wide each layer is, and the operators that evolve them.

A gene set is one choice per decoder block (EvoPress's search space, arXiv 2410.14649):

    blocks[i] in {keep, remove, fuse}    block i stays, is dropped, or is fused into its
                                         neighbours (FuseGPT) -- "out" means remove or fuse
    levels[i] in {0, ..., grid.max_level}  width level of kept block i: level l removes the
                                         fraction l * grid.step of its FFN+attention parameters
                                         (prune_width's per-layer ratio); 0 on every out block

The **budget** is counted in units of compression, two kinds that never trade against each other:
`blocks_out` (how many blocks are out) and `width_units` (the sum of the kept blocks' levels).
One width unit is `grid.step` of one layer's FFN+attention parameters, whichever layer holds it,
so a gene set on budget has the same parameter count as every other one on the same budget, up to
prune_width's rounding (attention comes in whole heads and the FFN absorbs the difference, so a
layer is within one FFN neuron of its ratio: far less than one unit; tests/test_structure.py).

Compiled plan (`compile_plan`), in this order, so that what the structure search scores is what
`evofuse compress --plan` replays:
    1. prune_width   {layer: level * step} on the original positions (statistics of the unpruned
                     model, one-shot, as the search's per-layer variants are computed)
    2. remove_blocks blocks: the removed original positions (shapes known: predict_num_params)
    3. fuse_blocks   blocks: the fused blocks' positions after step 2, trained in the plan

Operators (all deterministic from a `random.Random` the caller seeds, see `gene_rng`):
- `level_switch`: EvoPress's mutation. A depth switch moves "out" from one block to a kept one
  (the new out block hands its width level to the block coming back), a width switch moves one
  level from one kept layer to another. Both keep the budget exactly.
- `crossover`: per block, the (action, level) pair of one parent or the other, then `repair`
  back onto the budget (random blocks in or out, random levels up or down).
- `from_ranking`: the initial gene set of an importance ranking (Block Influence, Macro
  Influence, SLEB: the `blocks_out` lowest scores out) with the width budget spread evenly;
  `ranking_prior` turns the same scores into the mutation's preference for which block goes out.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, field_validator

from compression.errors import CompressionError

KEEP, REMOVE, FUSE = "keep", "remove", "fuse"
ACTIONS = (KEEP, REMOVE, FUSE)
Action = Literal["keep", "remove", "fuse"]


class GeneError(CompressionError):
    """A gene set or budget that does not fit the model; the message is one line."""


class WidthGrid(BaseModel):
    """The levels a layer's width may take: level l removes l * step of its FFN+attention params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: PositiveFloat = 0.0625
    max_level: PositiveInt = 8
    target: Literal["ffn", "heads", "both"] = "both"

    @field_validator("step")
    @classmethod
    def _step_below_one(cls, value):
        if value >= 1:
            raise ValueError(f"must be < 1, got {value}")
        return value

    def model_post_init(self, _context) -> None:
        if self.step * self.max_level >= 1:
            raise ValueError(f"max_level: {self.max_level} levels of {self.step} remove a whole layer (need step * max_level < 1)")

    def ratio(self, level: int) -> float:
        return round(level * self.step, 10)


class PlanKnobs(BaseModel):
    """What the compiled plan's steps do beyond the structure (Optuna's or the user's knobs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    criterion: str = "second_moment"  # prune_width's unit criterion
    reconstruct: Literal["none", "liar", "greedy"] = "liar"
    ridge: Optional[float] = None  # prune_width's relative ridge; None: the step's default
    fuse_rank: PositiveInt = 128
    fuse_steps: int = 100
    fuse_lr: PositiveFloat = 1e-2
    group_size: PositiveInt = 7


def ridge_field(ridge: float | None) -> dict:
    """A prune_width step's `ridge` entry: {"ridge": ridge} when one is set, else nothing, so
    the step keeps its own default and plans made before the setting read the same."""
    return {} if ridge is None else {"ridge": ridge}


@dataclass(frozen=True)
class Budget:
    blocks_out: int  # blocks removed or fused
    width_units: int  # sum of the kept blocks' width levels

    def check(self, num_blocks: int, grid: WidthGrid) -> None:
        if not 0 <= self.blocks_out < num_blocks:
            raise GeneError(f"blocks_out: {self.blocks_out} must be in [0, {num_blocks - 1}] for {num_blocks} blocks")
        room = (num_blocks - self.blocks_out) * grid.max_level
        if not 0 <= self.width_units <= room:
            raise GeneError(f"width_units: {self.width_units} must be in [0, {room}] ({num_blocks - self.blocks_out} kept blocks x max_level {grid.max_level})")


@dataclass(frozen=True)
class Genes:
    blocks: tuple[str, ...]
    levels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.levels):
            raise GeneError(f"genes: {len(self.blocks)} block actions but {len(self.levels)} width levels")
        for i, (action, level) in enumerate(zip(self.blocks, self.levels)):
            if action not in ACTIONS:
                raise GeneError(f"genes.blocks[{i}]: unknown action {action!r} (valid: {', '.join(ACTIONS)})")
            if level < 0 or (action != KEEP and level != 0):
                raise GeneError(f"genes.levels[{i}]: {level} (must be >= 0, and 0 on a {action} block)")

    @property
    def out(self) -> list[int]:
        return [i for i, a in enumerate(self.blocks) if a != KEEP]

    @property
    def kept(self) -> list[int]:
        return [i for i, a in enumerate(self.blocks) if a == KEEP]

    def budget(self) -> Budget:
        return Budget(len(self.out), sum(self.levels))

    def to_data(self) -> dict:
        return {"blocks": list(self.blocks), "levels": list(self.levels)}

    @classmethod
    def from_data(cls, data: dict, where: str = "genes") -> "Genes":
        if not isinstance(data, dict) or set(data) != {"blocks", "levels"}:
            raise GeneError(f"{where}: expected a mapping with 'blocks' and 'levels'")
        return cls(tuple(data["blocks"]), tuple(int(x) for x in data["levels"]))

    def check(self, num_blocks: int, grid: WidthGrid) -> None:
        if len(self.blocks) != num_blocks:
            raise GeneError(f"genes: {len(self.blocks)} blocks, the model has {num_blocks}")
        if not self.kept:
            raise GeneError("genes.blocks: every block is out (at least one must stay)")
        too_wide = [i for i, lv in enumerate(self.levels) if lv > grid.max_level]
        if too_wide:
            raise GeneError(f"genes.levels[{too_wide[0]}]: {self.levels[too_wide[0]]} > max_level {grid.max_level}")


# ------------------------------------------------------------------------------- compiling


def compile_plan(genes: Genes, grid: WidthGrid, knobs: PlanKnobs = PlanKnobs()) -> list[dict]:
    """The explicit plan (plain data, `compression.plan.parse_plan` reads it) the genes stand for."""
    plan: list[dict] = []
    widths = {i: grid.ratio(lv) for i, lv in enumerate(genes.levels) if lv > 0}
    if widths:
        plan.append({"op": "prune_width", "ratio": widths, "target": grid.target,
                     "criterion": knobs.criterion, "reconstruct": knobs.reconstruct,
                     **ridge_field(knobs.ridge)})
    removed = [i for i, a in enumerate(genes.blocks) if a == REMOVE]
    if removed:
        plan.append({"op": "remove_blocks", "blocks": removed})
    fused = [i for i, a in enumerate(genes.blocks) if a == FUSE]
    if fused:
        # positions after the removal: each fused block moves down by the removed blocks before it
        after_removal = [i - sum(r < i for r in removed) for i in fused]
        plan.append({"op": "fuse_blocks", "blocks": after_removal, "rank": knobs.fuse_rank,
                     "steps": knobs.fuse_steps, "lr": knobs.fuse_lr, "group_size": knobs.group_size})
    return plan


def genes_of_plan(plan: Sequence[dict], num_blocks: int, grid: WidthGrid) -> Genes | None:
    """The gene set `compile_plan` compiled into `plan` (its inverse), or None when the plan is
    not one (a `count` ranked by importance, a uniform float ratio, a ratio off the grid, steps
    out of compile_plan's order). Steps other than prune_width / remove_blocks / fuse_blocks
    (a TTM step) are not structure genes and are passed over; an empty plan is the dense model."""
    levels, blocks = [0] * num_blocks, [KEEP] * num_blocks
    order = [step.get("op") for step in plan if step.get("op") in ("prune_width", "remove_blocks", "fuse_blocks")]
    if order != sorted(order, key=("prune_width", "remove_blocks", "fuse_blocks").index) or len(set(order)) != len(order):
        return None
    removed: list[int] = []
    for step in plan:
        op = step.get("op")
        if op == "prune_width":
            if not isinstance(step.get("ratio"), dict):
                return None
            for layer, ratio in step["ratio"].items():
                level = round(float(ratio) / grid.step)
                if abs(grid.ratio(level) - float(ratio)) > 1e-9 or not 0 <= int(layer) < num_blocks:
                    return None
                levels[int(layer)] = level
        elif op in ("remove_blocks", "fuse_blocks"):
            if step.get("blocks") is None:
                return None
            # fuse_blocks positions count after the removal: map them back to original positions
            remaining = [i for i in range(num_blocks) if i not in removed]
            positions = list(step["blocks"]) if op == "remove_blocks" else [remaining[p] for p in step["blocks"] if p < len(remaining)]
            if len(positions) != len(step["blocks"]):
                return None
            for i in positions:
                blocks[i] = REMOVE if op == "remove_blocks" else FUSE
            removed += positions if op == "remove_blocks" else []
    try:
        return Genes(tuple(blocks), tuple(levels))
    except GeneError:  # a width level on an out block: not compiled from genes
        return None


def with_out_action(genes: Genes, action: str) -> Genes:
    """The same gene set with every out block taken out by `action` (remove or fuse)."""
    return Genes(tuple(a if a == KEEP else action for a in genes.blocks), genes.levels)


def width_unit_params(config, grid: WidthGrid) -> int:
    """Parameters one width unit stands for: `grid.step` of one layer's targeted parameters."""
    from compression.width import LayerDims

    dims = LayerDims.from_config(config)
    targeted = {"ffn": dims.ffn_params, "heads": dims.attn_params, "both": dims.ffn_params + dims.attn_params}[grid.target]
    return round(grid.step * targeted)


def budget_for(num_blocks: int, blocks_out: int, width_ratio: float, grid: WidthGrid) -> Budget:
    """The budget removing `blocks_out` blocks and `width_ratio` of the kept blocks' targeted
    parameters: round(width_ratio / step) units per kept block on average."""
    if not 0 <= width_ratio < 1:
        raise GeneError(f"width_ratio: {width_ratio} must be in [0, 1)")
    budget = Budget(blocks_out, round(width_ratio / grid.step * (num_blocks - blocks_out)))
    budget.check(num_blocks, grid)
    return budget


# ------------------------------------------------------------------------------- operators


def gene_rng(seed: int, *parts: int | str) -> random.Random:
    """A generator for (run seed, candidate id, ...): the same draws in every process (blake2b,
    not Python's salted hash), so a resumed search re-derives every candidate."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8, person=b"evofuse-genes")
    return random.Random(int.from_bytes(digest.digest(), "little"))


def _pick(rng: random.Random, items: Sequence[int], weights: Sequence[float] | None = None) -> int:
    if weights is None:
        return items[rng.randrange(len(items))]
    return rng.choices(list(items), weights=[weights[i] for i in items])[0]


def level_switch(genes: Genes, rng: random.Random, grid: WidthGrid, prior: Sequence[float] | None = None,
                 depth_share: float | None = None) -> Genes:
    """One budget-preserving move (EvoPress's level switch).

    Depth: an out block a comes back and a kept block b goes out with a's action; b's width
    level moves to a, so both budgets stay. `prior[i]` (optional, > 0) weighs how likely block i
    is chosen to go out. Width: one level moves from a kept layer with level > 0 to a kept layer
    below max_level. Which kind: `depth_share` (default: in proportion to how many of each
    move are possible, 0 when one kind is impossible)."""
    blocks, levels = list(genes.blocks), list(genes.levels)
    out, kept = genes.out, genes.kept
    can_depth = bool(out) and bool(kept)
    takers = [i for i in kept if levels[i] < grid.max_level]
    # a donor needs a taker other than itself (the only layer below max_level cannot give to itself)
    donors = [i for i in kept if levels[i] > 0 and any(t != i for t in takers)]
    can_width = bool(donors)
    if not can_depth and not can_width:
        return genes
    share = depth_share if depth_share is not None else (len(out) / (len(out) + sum(levels) or 1))
    if can_depth and (not can_width or rng.random() < share):
        back = _pick(rng, out)
        goes = _pick(rng, kept, prior)
        blocks[goes], blocks[back] = blocks[back], KEEP
        levels[back], levels[goes] = levels[goes], 0
    else:
        donor = _pick(rng, donors)
        taker = _pick(rng, [t for t in takers if t != donor])
        levels[donor] -= 1
        levels[taker] += 1
    return Genes(tuple(blocks), tuple(levels))


def mutate(genes: Genes, rng: random.Random, grid: WidthGrid, max_switches: int = 3,
           prior: Sequence[float] | None = None) -> Genes:
    """1 to `max_switches` level switches; the count is min of two uniform draws (EvoPress),
    so small steps are most likely."""
    switches = min(rng.randint(1, max_switches), rng.randint(1, max_switches))
    for _ in range(switches):
        genes = level_switch(genes, rng, grid, prior)
    return genes


def repair(genes: Genes, budget: Budget, rng: random.Random, grid: WidthGrid,
           prior: Sequence[float] | None = None) -> Genes:
    """The nearest gene set on `budget` by random single moves: blocks back in / out (a block
    going out becomes `remove`, keeping its `fuse` if it had one; `prior[i]` weighs how likely
    block i is the one), levels down / up."""
    blocks, levels = list(genes.blocks), list(genes.levels)
    while (out := [i for i, a in enumerate(blocks) if a != KEEP]) and len(out) > budget.blocks_out:
        blocks[_pick(rng, out)] = KEEP
    while len(out := [i for i, a in enumerate(blocks) if a != KEEP]) < budget.blocks_out:
        goes = _pick(rng, [i for i, a in enumerate(blocks) if a == KEEP], prior)
        blocks[goes], levels[goes] = REMOVE, 0
    levels = [lv if a == KEEP else 0 for a, lv in zip(blocks, levels)]
    while sum(levels) > budget.width_units:
        i = _pick(rng, [i for i, lv in enumerate(levels) if lv > 0])
        levels[i] -= 1
    while sum(levels) < budget.width_units:
        i = _pick(rng, [i for i, a in enumerate(blocks) if a == KEEP and levels[i] < grid.max_level])
        levels[i] += 1
    return Genes(tuple(blocks), tuple(levels))


def crossover(a: Genes, b: Genes, rng: random.Random, grid: WidthGrid, budget: Budget,
              prior: Sequence[float] | None = None) -> Genes:
    """Uniform per-block crossover of (action, level), then `repair` onto the budget (`prior`:
    which blocks the repair prefers to take out)."""
    if len(a.blocks) != len(b.blocks):
        raise GeneError(f"crossover: parents have {len(a.blocks)} and {len(b.blocks)} blocks")
    picks = [(a if rng.random() < 0.5 else b) for _ in a.blocks]
    child = Genes(tuple(p.blocks[i] for i, p in enumerate(picks)), tuple(p.levels[i] for i, p in enumerate(picks)))
    return repair(child, budget, rng, grid, prior)


def uniform_levels(kept: Sequence[int], num_blocks: int, width_units: int) -> list[int]:
    """`width_units` spread over the kept blocks as evenly as possible (the remainder to the
    first ones): the uniform-ratio starting point."""
    levels = [0] * num_blocks
    base, extra = divmod(width_units, len(kept))
    for k, i in enumerate(kept):
        levels[i] = base + (1 if k < extra else 0)
    return levels


def from_ranking(scores: Sequence[float], budget: Budget, action: str = REMOVE) -> Genes:
    """The gene set of a block-importance ranking: the `blocks_out` lowest scores out (ties by
    position), width units spread evenly over the rest."""
    n = len(scores)
    out = set(sorted(range(n), key=lambda i: (scores[i], i))[: budget.blocks_out])
    blocks = tuple(action if i in out else KEEP for i in range(n))
    kept = [i for i in range(n) if i not in out]
    return Genes(blocks, tuple(uniform_levels(kept, n, budget.width_units)))


def ranking_prior(scores: Sequence[float], strength: float = 0.5) -> list[float]:
    """Mutation weights from importance scores: a mix of uniform and 1 / (rank + 1), so the
    least important blocks go out more often and every block still can. Weights sum to 1."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    by_rank = [0.0] * n
    for rank, i in enumerate(order):
        by_rank[i] = 1.0 / (rank + 1)
    total = sum(by_rank)
    return [(1 - strength) / n + strength * w / total for w in by_rank]


__all__ = [
    "ACTIONS", "Budget", "FUSE", "GeneError", "Genes", "KEEP", "PlanKnobs", "REMOVE", "WidthGrid",
    "budget_for", "compile_plan", "crossover", "from_ranking", "gene_rng", "genes_of_plan", "level_switch", "mutate",
    "ranking_prior", "repair", "uniform_levels", "width_unit_params", "with_out_action",
]
