"""`prune_width`: remove FFN neurons and attention heads, reconstruct in closed form.

Plan step (YAML):  {op: prune_width, ratio: 0.25, target: both, criterion: second_moment,
                    reconstruct: greedy, layers: [0, 1, 2]}

Units (depth-2 structures; shapes really shrink):
- FFN neuron j: row j of gate_proj and up_proj, column j of down_proj.
- Attention: query head h (its q_proj rows, its o_proj columns) and KV group g (its k_proj and
  v_proj rows). A removed KV group takes its query heads with it. Transformers' attention maps
  query head i to KV head i // (heads per group), so every kept group keeps the same number of
  query heads: a layer's attention shape is (g groups kept, q heads per group kept).

`ratio` is the fraction of the targeted parameters removed from each chosen layer:
- ffn: round(ratio · intermediate_size) neurons.
- heads: the (g, q) whose kept share of attention parameters, g(q+1) / (G(n_rep+1)), is closest
  to 1 − ratio (ties keep more). Heads come in coarse steps (SmolLM2: 9 heads in 3 groups).
- both: the heads shape as above, then as many FFN neurons as make the layer's removed
  FFN+attention parameters closest to `ratio` of them (the FFN absorbs the heads' rounding).
`ratio` may also be a mapping {layer: ratio} (non-uniform widths; such a model saves with
`compression.loader.save_compressed` and loads with `load_compressed`, not plain transformers).

Reconstruction (see compression/reconstruct.py for the math):
- none: drop the units.
- liar: drop the units the criterion ranks lowest, fold the ridge least-squares interpolation of
  their activations into down_proj / o_proj.
- greedy: pick units greedily by the refit-error increase, among the `greedy_pool` × n lowest
  by the criterion (None: among all units), then the same least-squares refit.
All layers' statistics come from one streaming pass of the unpruned model over the calibration
batches (one-shot; layers do not see their pruned predecessors).

Measured on SmolLM2-135M-Instruct, 25% of FFN+attention parameters removed, 32×128 calibration
tokens, pydoc test perplexity on 8 windows (dense 12.73; benchmarks/results/width_quick.md):
without reconstruction every criterion collapses (magnitude 2·10⁶, wanda 82, second_moment 79,
similarity 87); LIAR brings second_moment to 20.8 (73% of the lost log-perplexity back) and
wanda / similarity to 22.3 / 20.8; greedy rescues even magnitude (441 → 23.1) but is not better
than LIAR after a good criterion (second_moment 21.6) and costs ~10× the pruning time. Hence the
defaults: criterion second_moment, reconstruct liar; greedy is the robust choice for a weak
criterion. With second_moment at 10% (FFN only; heads come in 25% steps): none 14.42, liar 14.13,
greedy 14.22; at 40% (one KV group + FFN): none 70.0, liar 40.9, greedy 29.8 — there greedy's
selection pays off. Ridge 1e-2 and greedy_rounds 16 were not tuned (no CPU time left to).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from compression.arch import decoder_blocks
from compression.calibration import CalibrationData
from compression.criteria import CRITERIA, NEEDS_GRAM, UNIT_BLOCKS_SUFFICE, UnitStats, score_units, unit_diagonal_blocks
from compression.plan import PlanError, register_op
from compression.reconstruct import (
    GramAccumulator,
    collect_grams_by_block,
    greedy_removal,
    refit_output_projection,
    with_bias_column,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class PruneWidthStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["prune_width"] = "prune_width"
    ratio: float | dict[int, float]  # fraction of targeted params removed per layer, or {layer: ratio}
    target: Literal["ffn", "heads", "both"] = "both"
    criterion: str = "second_moment"  # one of compression.criteria.CRITERIA
    reconstruct: Literal["none", "liar", "greedy"] = "liar"
    layers: list[int] | None = None  # default: every block (with a float ratio)
    ridge: float = 1e-2  # relative ridge λ/mean(diag G) of the least-squares fold
    greedy_pool: float | None = 2.0  # greedy chooses among the pool·n lowest-scored units; None: all
    greedy_rounds: int = 16  # FFN: greedy rounds per layer, each removing n/rounds units (heads: one per round)
    samples: int | None = None  # calibration sequences used (default: all given)
    batch_size: int = 8  # calibration sequences per forward pass

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value):
        for r in value.values() if isinstance(value, dict) else [value]:
            if not 0.0 < r < 1.0:
                raise PydanticCustomError("ratio_range", "must be in (0, 1), got {r}", {"r": r})
        if isinstance(value, dict) and not value:
            raise PydanticCustomError("ratio_empty", "a per-layer mapping needs at least one layer", {})
        return value

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value):
        if value not in CRITERIA:
            valid = ", ".join(sorted(CRITERIA))
            raise PydanticCustomError("criterion", f"unknown criterion {value!r} (valid: {valid})".replace("{", "{{").replace("}", "}}"))
        return value

    @field_validator("ridge")
    @classmethod
    def _ridge_non_negative(cls, value):
        if value < 0:
            raise PydanticCustomError("ridge", "must be >= 0, got {v}", {"v": value})
        return value

    @field_validator("greedy_pool")
    @classmethod
    def _pool_at_least_one(cls, value):
        if value is not None and value < 1:
            raise PydanticCustomError("pool", "must be >= 1 or null, got {v}", {"v": value})
        return value

    @field_validator("greedy_rounds", "batch_size", "samples")
    @classmethod
    def _positive(cls, value):
        if value is not None and value < 1:
            raise PydanticCustomError("positive", "must be >= 1, got {v}", {"v": value})
        return value

    @model_validator(mode="after")
    def _layers_xor_mapping(self):
        if isinstance(self.ratio, dict) and self.layers is not None:
            raise PydanticCustomError("layers", "give either layers or a per-layer ratio mapping, not both", {})
        return self

    def layer_ratios(self, num_layers: int) -> dict[int, float]:
        """{layer index: ratio} for the chosen layers; PlanError for an index out of range."""
        if isinstance(self.ratio, dict):
            chosen, field = dict(self.ratio), "ratio"
        else:
            chosen, field = {i: self.ratio for i in (self.layers if self.layers is not None else range(num_layers))}, "layers"
        for i in chosen:
            if not 0 <= i < num_layers:
                raise PlanError(f"{field}: layer {i} out of range (the model has {num_layers} blocks)")
        return chosen

    def check(self, config) -> None:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise PlanError(f"op: prune_width supports {', '.join(SUPPORTED_MODEL_TYPES)}, not model_type {config.model_type!r}")
        for layer, ratio in self.layer_ratios(config.num_hidden_layers).items():
            plan_layer(ratio, self.target, LayerDims.from_config(config), layer)


@dataclass(frozen=True)
class LayerDims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "LayerDims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv, head_dim)

    @classmethod
    def from_block(cls, block: nn.Module) -> "LayerDims":
        attn, mlp = block.self_attn, block.mlp
        hd = attn.head_dim
        return cls(mlp.down_proj.out_features, mlp.down_proj.in_features, attn.q_proj.out_features // hd,
                   attn.k_proj.out_features // hd, hd)

    @property
    def ffn_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def attn_params(self) -> int:
        return 2 * self.hidden * self.head_dim * (self.heads + self.kv_heads)


@dataclass(frozen=True)
class LayerCut:
    ffn_remove: int  # FFN neurons to remove
    groups_kept: int  # KV groups kept (g)
    heads_per_group: int  # query heads kept in each kept group (q)

    def removes_heads(self, dims: LayerDims) -> bool:
        return self.groups_kept * self.heads_per_group < dims.heads


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def attention_shape(ratio: float, dims: LayerDims) -> tuple[int, int]:
    """(g, q) whose kept attention-parameter share g(q+1)/(G(n_rep+1)) is closest to 1 − ratio."""
    G, n_rep = dims.kv_heads, dims.heads // dims.kv_heads
    options = [(0, 0)] + [(g, q) for g in range(1, G + 1) for q in range(1, n_rep + 1)]
    share = lambda gq: gq[0] * (gq[1] + 1) / (G * (n_rep + 1))  # noqa: E731
    return min(options, key=lambda gq: (abs(share(gq) - (1 - ratio)), -share(gq), -gq[1]))


def plan_layer(ratio: float, target: str, dims: LayerDims, layer: int) -> LayerCut:
    """How many units of each kind layer `layer` loses; PlanError if none would be left."""
    n_rep = dims.heads // dims.kv_heads
    g, q = dims.kv_heads, n_rep
    removed_attn = 0
    if target in ("heads", "both"):
        g, q = attention_shape(ratio, dims)
        if g == 0:
            raise PlanError(
                f"ratio: {ratio} leaves layer {layer} with no attention head "
                f"({dims.heads} heads in {dims.kv_heads} KV groups)"
            )
        removed_attn = 2 * dims.hidden * dims.head_dim * (dims.heads + dims.kv_heads - g * q - g)
    ffn_remove = 0
    if target == "ffn":
        ffn_remove = _round(ratio * dims.intermediate)
    elif target == "both":
        wanted = ratio * (dims.ffn_params + dims.attn_params) - removed_attn
        ffn_remove = max(0, _round(wanted / (3 * dims.hidden)))
    if ffn_remove >= dims.intermediate:
        raise PlanError(f"ratio: {ratio} leaves layer {layer} with no FFN neuron (intermediate size {dims.intermediate})")
    return LayerCut(ffn_remove, g, q)


# ---------------------------------------------------------------- applying a cut to modules


def sliced_linear(linear: nn.Linear, rows=None, cols=None, weight=None, bias=None) -> nn.Linear:
    """A new nn.Linear keeping `rows` (outputs) and `cols` (inputs) of `linear`, or with the
    given `weight` (out, in) / `bias` in place of the sliced ones."""
    w = linear.weight.data
    if weight is None:
        weight = w[rows] if rows is not None else w
        weight = weight[:, cols] if cols is not None else weight
    if bias is None and linear.bias is not None:
        bias = linear.bias.data[rows] if rows is not None else linear.bias.data
    # Built on the meta device: a real one would first fill its weight with Kaiming-uniform
    # draws, a quarter of a LIAR width plan's time on SmolLM2, only to overwrite them.
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(weight.to(device=w.device, dtype=w.dtype, copy=True))
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype, copy=True))
    return new


def _candidate_pool(scores: torch.Tensor, n_remove: int, factor: float | None) -> list[int] | None:
    if factor is None:
        return None
    size = min(scores.numel(), max(n_remove, math.ceil(factor * n_remove)))
    return scores.argsort()[:size].tolist()


@dataclass(frozen=True)
class UnitGrams:
    """A layer's statistics reduced to each unit's diagonal block of the Gram matrix: all that a
    `UNIT_BLOCKS_SUFFICE` criterion reads (compression/criteria.py), and not enough to
    reconstruct."""

    blocks: torch.Tensor  # (U, s) the output projection's columns owned by each unit
    values: torch.Tensor  # (U, s, s) float64 G_{b_u b_u}

    @classmethod
    def of(cls, acc: GramAccumulator, blocks: torch.Tensor) -> "UnitGrams":
        # The entries of acc.gram()'s blocks to the bit: its division by the count is elementwise.
        return cls(blocks, unit_diagonal_blocks(acc.sum_outer, blocks) / max(acc.count, 1))


def ffn_unit_columns(mlp: nn.Module) -> torch.Tensor:
    """(I, 1): down_proj's column of each FFN neuron."""
    return torch.arange(mlp.down_proj.in_features).unsqueeze(1)


def head_unit_columns(attn: nn.Module) -> torch.Tensor:
    """(H, head_dim): o_proj's columns of each query head."""
    hd = attn.head_dim
    return torch.arange(attn.q_proj.out_features).view(-1, hd)


def unit_stats(acc: GramAccumulator | UnitGrams | None, out_weight: torch.Tensor, blocks: torch.Tensor,
               in_norm_sq: torch.Tensor) -> UnitStats:
    """What the criterion sees of a layer, from whole statistics or from its units' blocks."""
    if isinstance(acc, UnitGrams):
        if not torch.equal(acc.blocks, blocks):
            raise ValueError(f"statistics of units {tuple(acc.blocks.shape)} given for units {tuple(blocks.shape)}")
        return UnitStats(None, out_weight, blocks, in_norm_sq, unit_gram=acc.values)
    return UnitStats(acc.gram() if acc is not None else None, out_weight, blocks, in_norm_sq)


def _output_weight(linear: nn.Linear, acc: GramAccumulator | None):
    """(gram, weight) of the output projection in float64, with a bias column if it has one."""
    if isinstance(acc, UnitGrams):
        raise ValueError("reconstruction needs a layer's whole Gram matrix, not only its units' blocks")
    weight = linear.weight.data.double().cpu()  # (d, n)
    gram = acc.gram() if acc is not None else None
    if linear.bias is not None and gram is not None:
        return with_bias_column(gram, acc.mean(), weight, linear.bias.data.double().cpu())
    return gram, weight


def _new_output_projection(linear: nn.Linear, kept_cols: torch.Tensor, acc, step: PruneWidthStep) -> nn.Linear:
    if step.reconstruct == "none":
        return sliced_linear(linear, cols=kept_cols)
    gram, weight = _output_weight(linear, acc)
    n = linear.in_features
    cols = kept_cols if linear.bias is None else torch.cat([kept_cols, torch.tensor([n])])
    refit = refit_output_projection(gram, weight, cols, step.ridge)  # (d, k[+1])
    if linear.bias is None:
        return sliced_linear(linear, weight=refit)
    return sliced_linear(linear, weight=refit[:, :-1], bias=refit[:, -1])


@torch.no_grad()
def prune_ffn(mlp: nn.Module, n_remove: int, acc: GramAccumulator | UnitGrams | None, step: PruneWidthStep) -> None:
    if n_remove == 0:
        return
    I = mlp.down_proj.in_features
    blocks = ffn_unit_columns(mlp)  # (I, 1): one column per neuron
    in_norm_sq = mlp.gate_proj.weight.double().pow(2).sum(1) + mlp.up_proj.weight.double().pow(2).sum(1)
    scores = score_units(step.criterion, unit_stats(acc, mlp.down_proj.weight.double().cpu(), blocks, in_norm_sq.cpu()))
    if step.reconstruct == "greedy":
        g, w = _output_weight(mlp.down_proj, acc)
        removed = greedy_removal(g, w, blocks, n_remove, ridge=step.ridge, per_round=math.ceil(n_remove / step.greedy_rounds),
                                 candidates=_candidate_pool(scores, n_remove, step.greedy_pool))
    else:
        removed = scores.argsort()[:n_remove].tolist()
    keep = torch.ones(I, dtype=torch.bool)
    keep[removed] = False
    kept = keep.nonzero().squeeze(1)  # (I - n_remove,) ascending
    mlp.down_proj = _new_output_projection(mlp.down_proj, kept, acc, step)
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=kept)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = kept.numel()


def _choose_heads_by_score(scores: torch.Tensor, G: int, n_rep: int, g: int, q: int) -> tuple[list[int], list[int]]:
    per_group = scores.view(G, n_rep)  # (G, n_rep)
    top = per_group.topk(q, dim=1)  # each group's best q heads
    kept_groups = top.values.sum(1).topk(g).indices.sort().values.tolist()
    heads = [sorted((grp * n_rep + top.indices[grp]).tolist()) for grp in kept_groups]
    return kept_groups, [h for hs in heads for h in hs]


def _choose_heads_greedily(scores, gram, weight, G, n_rep, hd, g, q, step) -> tuple[list[int], list[int]]:
    head_blocks = torch.arange(G * n_rep * hd).view(G * n_rep, hd)  # (H, hd) o_proj columns per head
    removed_groups: list[int] = []
    if g < G:
        group_scores = scores.view(G, n_rep).sum(1)
        removed_groups = greedy_removal(gram, weight, head_blocks.view(G, n_rep * hd), G - g, ridge=step.ridge,
                                        candidates=_candidate_pool(group_scores, G - g, step.greedy_pool))
    kept_groups = sorted(set(range(G)) - set(removed_groups))
    removed_heads: list[int] = []
    if q < n_rep:
        candidates: list[int] = []
        for grp in kept_groups:
            pool = _candidate_pool(scores[grp * n_rep:(grp + 1) * n_rep], n_rep - q, step.greedy_pool)
            candidates += [grp * n_rep + h for h in (pool if pool is not None else range(n_rep))]
        gone = head_blocks.view(G, n_rep * hd)[removed_groups].reshape(-1)
        removed_heads = greedy_removal(gram, weight, head_blocks, g * (n_rep - q), ridge=step.ridge,
                                       candidates=candidates, groups=torch.arange(G * n_rep) // n_rep,
                                       quota=n_rep - q, already_removed=gone)
    heads = [h for grp in kept_groups for h in range(grp * n_rep, (grp + 1) * n_rep) if h not in removed_heads]
    return kept_groups, heads


@torch.no_grad()
def prune_attention(attn: nn.Module, cut: LayerCut, acc: GramAccumulator | UnitGrams | None, step: PruneWidthStep) -> None:
    hd = attn.head_dim
    H, G = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    n_rep, g, q = H // G, cut.groups_kept, cut.heads_per_group
    if g * q == H:
        return
    head_blocks = head_unit_columns(attn)  # (H, hd)
    in_norm_sq = attn.q_proj.weight.double().view(H, hd, -1).pow(2).sum(dim=(1, 2)).cpu()
    scores = score_units(step.criterion, unit_stats(acc, attn.o_proj.weight.double().cpu(), head_blocks, in_norm_sq))
    if step.reconstruct == "greedy":
        gram_b, weight_b = _output_weight(attn.o_proj, acc)
        kept_groups, kept_heads = _choose_heads_greedily(scores, gram_b, weight_b, G, n_rep, hd, g, q, step)
    else:
        kept_groups, kept_heads = _choose_heads_by_score(scores, G, n_rep, g, q)
    head_rows = head_blocks[kept_heads].reshape(-1)  # q_proj rows == o_proj columns, group-major
    kv_rows = torch.arange(G * hd).view(G, hd)[kept_groups].reshape(-1)
    attn.o_proj = _new_output_projection(attn.o_proj, head_rows, acc, step)
    attn.q_proj = sliced_linear(attn.q_proj, rows=head_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.num_key_value_groups = q
    for name, value in (("num_heads", g * q), ("num_key_value_heads", g)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def sync_config_widths(model: nn.Module) -> None:
    """Write per-layer widths into the config where every block agrees (so plain transformers
    rebuilds the model); head_dim is always written explicitly, since it no longer equals
    hidden_size / num_attention_heads once heads are gone."""
    blocks, config = decoder_blocks(model), model.config
    dims = {LayerDims.from_block(b) for b in blocks}
    if len({d.intermediate for d in dims}) == 1:
        config.intermediate_size = next(iter(dims)).intermediate
    if len({(d.heads, d.kv_heads) for d in dims}) == 1:
        config.num_attention_heads = next(iter(dims)).heads
        config.num_key_value_heads = next(iter(dims)).kv_heads
    config.head_dim = next(iter(dims)).head_dim


def is_uniform(model: nn.Module) -> bool:
    return len({LayerDims.from_block(b) for b in decoder_blocks(model)}) == 1


def layer_cuts(model: nn.Module, step: PruneWidthStep) -> dict[int, LayerCut]:
    """{block index: its cut}, from the blocks' current widths; PlanError where none would be left."""
    step.check(model.config)
    blocks = decoder_blocks(model)
    return {i: plan_layer(r, step.target, LayerDims.from_block(blocks[i]), i) for i, r in step.layer_ratios(len(blocks)).items()}


def watched_projections(model: nn.Module, cuts: dict[int, LayerCut]) -> dict[str, nn.Linear]:
    """The output projections whose input statistics the cuts need, named "{i}.ffn" / "{i}.attn"."""
    blocks, watched = decoder_blocks(model), {}
    for i, cut in cuts.items():
        if cut.ffn_remove:
            watched[f"{i}.ffn"] = blocks[i].mlp.down_proj
        if cut.removes_heads(LayerDims.from_block(blocks[i])):
            watched[f"{i}.attn"] = blocks[i].self_attn.o_proj
    return watched


def targeted_projections(model: nn.Module, target: str) -> dict[str, nn.Linear]:
    """Every block's output projection a step with this `target` may cut the input of, named
    as in `watched_projections`: the statistics any ratios of such a step can need."""
    watched = {}
    for i, block in enumerate(decoder_blocks(model)):
        if target in ("ffn", "both"):
            watched[f"{i}.ffn"] = block.mlp.down_proj
        if target in ("heads", "both"):
            watched[f"{i}.attn"] = block.self_attn.o_proj
    return watched


def needs_stats(step: PruneWidthStep) -> bool:
    """Whether the step's criterion or reconstruction reads calibration statistics."""
    return step.reconstruct != "none" or step.criterion in NEEDS_GRAM


def unit_blocks_suffice(step: PruneWidthStep) -> bool:
    """Whether the step reads no more of its statistics than each unit's diagonal block: it
    reconstructs nothing and its criterion is one of `UNIT_BLOCKS_SUFFICE`."""
    return step.reconstruct == "none" and step.criterion in UNIT_BLOCKS_SUFFICE


def width_stats_bytes(model: nn.Module, target: str) -> int:
    """What `collect_width_stats(..., every_layer=True)` holds: a float64 n x n Gram matrix per
    targeted output projection."""
    return sum(8 * linear.in_features**2 for linear in targeted_projections(model, target).values())


def collect_width_stats(model: nn.Module, step: PruneWidthStep, calibration: CalibrationData | None,
                        every_layer: bool = False, consume=None) -> dict[str, GramAccumulator]:
    """One pass of the (unpruned) model over the calibration batches, block by block
    (`collect_grams_by_block`): the statistics of the layers the step cuts, or with `every_layer`
    of every layer its target reaches (one pass that serves any ratios of the same target,
    samples and batches on the same weights). `consume(block index, its statistics)` takes each
    block's as soon as they are complete instead of returning them all."""
    if not needs_stats(step):
        return {}
    if calibration is None:
        raise PlanError(f"calibration: prune_width with criterion {step.criterion!r} and reconstruct "
                        f"{step.reconstruct!r} needs calibration data")
    data = calibration if step.samples is None else calibration.take(step.samples)
    watched = targeted_projections(model, step.target) if every_layer else watched_projections(model, layer_cuts(model, step))
    was_training = model.training
    model.eval()
    try:
        return collect_grams_by_block(model, data.batches(step.batch_size), watched, consume)
    finally:
        model.train(was_training)


def collect_unit_grams(model: nn.Module, step: PruneWidthStep, calibration: CalibrationData | None) -> dict[str, UnitGrams]:
    """The statistics of every layer the step's target reaches, as `collect_width_stats(...,
    every_layer=True)`, each block's reduced to its units' diagonal blocks as soon as the pass
    has completed them: for a step that `unit_blocks_suffice`, the same choices from a fraction
    of the memory (the Llama-2-7B shape: 137 MB against 35 GB). One block's whole matrices are
    alive at a time."""
    if not unit_blocks_suffice(step):
        raise ValueError(f"criterion {step.criterion!r} with reconstruct {step.reconstruct!r} reads more than the units' blocks")
    blocks, kept = decoder_blocks(model), {}

    def reduce(i: int, grams: dict[str, GramAccumulator]) -> None:
        for name, acc in grams.items():
            columns = ffn_unit_columns(blocks[i].mlp) if name.endswith(".ffn") else head_unit_columns(blocks[i].self_attn)
            kept[name] = UnitGrams.of(acc, columns)

    collect_width_stats(model, step, calibration, every_layer=True, consume=reduce)
    return kept


def prune_with_stats(model: nn.Module, step: PruneWidthStep, grams: dict[str, GramAccumulator | UnitGrams]) -> nn.Module:
    """Apply the cuts using already collected statistics (names as in `watched_projections`;
    statistics of other layers are ignored)."""
    blocks = decoder_blocks(model)
    for i, cut in layer_cuts(model, step).items():
        prune_block(blocks[i], i, cut, grams, step)
    sync_config_widths(model)
    return model


def prune_block(block: nn.Module, i: int, cut: LayerCut, grams: dict[str, GramAccumulator | UnitGrams], step: PruneWidthStep) -> None:
    """Cut block `i`'s heads and FFN units (its statistics named as in `watched_projections`)."""
    prune_attention(block.self_attn, cut, grams.get(f"{i}.attn"), step)
    prune_ffn(block.mlp, cut.ffn_remove, grams.get(f"{i}.ffn"), step)


def apply_plan_from_stats(model: nn.Module, steps: list, grams: dict[str, GramAccumulator | UnitGrams], calibration) -> nn.Module:
    """`apply_plan`, its first step a `prune_width` that takes already gathered statistics
    (`collect_width_stats(..., every_layer=True)`, or `collect_unit_grams` where its units'
    blocks suffice, on these weights) instead of its own pass."""
    from compression.plan import apply_plan

    layer_cuts(model, steps[0])  # a step that does not fit fails before any work
    return apply_plan(prune_with_stats(model, steps[0], grams), steps[1:], calibration)


def pruned_shape(skeleton: nn.Module, step: PruneWidthStep) -> nn.Module:
    """Shapes after the cuts: which units go depends on the data, how many does not."""
    blocks = decoder_blocks(skeleton)
    for i, cut in layer_cuts(skeleton, step).items():
        attn, mlp = blocks[i].self_attn, blocks[i].mlp
        hd = attn.head_dim
        heads, groups = torch.arange(cut.groups_kept * cut.heads_per_group * hd), torch.arange(cut.groups_kept * hd)
        attn.q_proj, attn.o_proj = sliced_linear(attn.q_proj, rows=heads), sliced_linear(attn.o_proj, cols=heads)
        attn.k_proj, attn.v_proj = sliced_linear(attn.k_proj, rows=groups), sliced_linear(attn.v_proj, rows=groups)
        kept = torch.arange(mlp.down_proj.in_features - cut.ffn_remove)
        mlp.gate_proj, mlp.up_proj = sliced_linear(mlp.gate_proj, rows=kept), sliced_linear(mlp.up_proj, rows=kept)
        mlp.down_proj = sliced_linear(mlp.down_proj, cols=kept)
    return skeleton


@register_op("prune_width", PruneWidthStep, reshape=pruned_shape)
def prune_width(model: nn.Module, step: PruneWidthStep, calibration: CalibrationData | None) -> nn.Module:
    """Each block is cut as soon as its statistics are complete, which is after the pass has
    carried the calibration batches through it unpruned (one-shot: no block sees a pruned
    predecessor), so one block's Gram matrices are alive at a time. The cuts, and the bytes, are
    those of `prune_with_stats` after a pass over every layer."""
    cuts = layer_cuts(model, step)  # reject a step that does not fit before the calibration pass
    blocks, done = decoder_blocks(model), set()

    def cut_block(i: int, grams: dict[str, GramAccumulator]) -> None:
        if i in cuts:
            prune_block(blocks[i], i, cuts[i], grams, step)
            done.add(i)

    collect_width_stats(model, step, calibration, consume=cut_block)
    for i in sorted(cuts.keys() - done):  # after the last watched block, or no statistics needed
        prune_block(blocks[i], i, cuts[i], {}, step)
    sync_config_widths(model)
    return model
