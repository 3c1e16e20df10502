"""Depth compression plan ops: `remove_blocks` and `fuse_blocks`.

    - {op: remove_blocks, count: 8, importance: block_influence}
    - {op: remove_blocks, count: 8, importance: sleb}                      # greedy, iterative
    - {op: remove_blocks, count: 8, importance: macro_influence, steps: 100, lr: 1e-4}
    - {op: fuse_blocks, count: 8, importance: macro_influence, rank: 128, steps: 100, group_size: 7}
    - {op: remove_blocks, blocks: [4, 12, 13, 25]}                         # explicit positions

Both take blocks out one at a time, in the order the importance criterion gives (lowest score
first). With `blocks` (positions in the model the step receives) instead of `count`, the set is
given and no importance is computed (how an evolved structure, compression/genes.py, compiles):
removal takes them all at once; fusion / healing take them from the highest position down, so
every listed position still names the block it named when the step began. `fuse_blocks` injects each removed block into its neighbours (FuseGPT, see
compression/fusegpt.py), trains the fusion coefficients for `steps` steps and folds everything
back into plain layers at the end. `remove_blocks` with `steps > 0` is the fair baseline: after
each removal the same neighbours' full weights are fine-tuned with the same local distillation,
data and step budget. With `steps: 0` it is plain removal (ShortGPT / SLEB / MI ranking).

Calibration: the first `importance_samples` windows score importance; local distillation uses
all windows. `iterative` (default: the method's own — SLEB and fuse_blocks rescore after every
removal, Block / Macro Influence removal scores once) decides whether scores are recomputed on
the changed model before each removal.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from compression import arch
from compression.calibration import CalibrationData
from compression.fusegpt import DistillSettings, fold_fused, fuse_block, heal_block_removal
from compression.importance import ImportanceName, select_blocks
from compression.plan import PlanError, register_op

log = logging.getLogger(__name__)


class _DepthStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: PositiveInt | None = None  # blocks to take out, ranked by `importance` ...
    blocks: list[int] | None = None  # ... or exactly these positions (no ranking)
    importance: ImportanceName = "block_influence"
    iterative: bool | None = None  # rescore after each removal; None: the method's default
    importance_samples: PositiveInt = 32  # first windows of the calibration data used for scoring
    steps: NonNegativeInt = 0  # local-distillation optimizer steps per removed block
    group_size: PositiveInt = 7  # neighbours trained around each removed block
    lr: PositiveFloat = 3e-4  # for `steps > 0`: fine-tuning full weights (see FuseBlocksStep.lr)
    batch_size: PositiveInt = 4  # windows per optimizer step (and per scoring batch)
    loss: Literal["mse", "kl"] = "mse"
    seed: int = 0

    @model_validator(mode="after")
    def _count_or_blocks(self):
        if (self.count is None) == (self.blocks is None):
            raise PydanticCustomError("count_or_blocks", "give either count or blocks (explicit positions), not both or neither", {})
        if self.blocks is not None:
            if not self.blocks:
                raise PydanticCustomError("blocks_empty", "blocks: needs at least one position", {})
            if len(set(self.blocks)) != len(self.blocks):
                raise PydanticCustomError("blocks_dup", "blocks: a position is listed twice", {})
            self.blocks = sorted(self.blocks)
        return self

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler):
        """Dump only the one of count / blocks that is given (plans read back as written)."""
        data = handler(self)
        for key in ("count", "blocks"):
            if data.get(key, 0) is None:
                data.pop(key)
        return data

    @property
    def num_out(self) -> int:
        """How many blocks the step takes out."""
        return len(self.blocks) if self.blocks is not None else self.count

    def check(self, config) -> None:
        try:
            arch.check_removable(config)
            n = arch.num_blocks(config)
        except arch.UnsupportedArchitecture as exc:
            raise PlanError(f"op: {self.op} {exc}") from None
        _check_count(self, n, f"{arch.arch_of(config).num_layers_field} {n}")

    def is_iterative(self) -> bool:
        return self.iterative if self.iterative is not None else self.importance == "sleb"

    def distill_settings(self) -> DistillSettings:
        return DistillSettings(steps=self.steps, lr=self.lr, batch_size=self.batch_size, loss=self.loss, seed=self.seed)


class RemoveBlocksStep(_DepthStep):
    op: Literal["remove_blocks"] = "remove_blocks"


class FuseBlocksStep(_DepthStep):
    op: Literal["fuse_blocks"] = "fuse_blocks"
    importance: ImportanceName = "macro_influence"
    rank: PositiveInt = 128  # rank r of each C (out x r) @ D (r x in) coefficient
    steps: NonNegativeInt = 100
    # Measured on SmolLM2-135M (block 14, group 7, 20 steps of 4x128 tokens, held-out local loss):
    # fusion lr 1e-3: 0.0305, 3e-3: 0.0269, 1e-2: 0.0239, 3e-2: 0.0455 (diverges); full-weight
    # healing lr 1e-5: 0.0346, 1e-4: 0.0274, 3e-4: 0.0248, 1e-3: 0.0304; unhealed removal: 0.0398.
    # The public code's 1e-3 goes with a far longer budget (20 epochs of 1024 sequences).
    lr: PositiveFloat = 1e-2
    # Fold the fused layers after each block's distillation: earlier coefficients are then frozen
    # and later groups start from plain layers. The public code instead appends triples and
    # retrains earlier ones; on SmolLM2-135M, 8 of 30 blocks, 20 steps per block, test ppl:
    # fold each 29.0 (lr 1e-2), append 38.7 (lr 1e-2) / 31.6 (lr 3e-3); see benchmarks/results.
    fold_each: bool = True

    def is_iterative(self) -> bool:
        return self.iterative if self.iterative is not None else True


def _check_count(step: _DepthStep, n: int, what: str) -> None:
    if step.num_out >= n:
        raise PlanError(f"{'blocks' if step.blocks is not None else 'count'}: {step.num_out} >= {what}")
    if step.blocks is not None:
        bad = [i for i in step.blocks if not 0 <= i < n]
        if bad:
            raise PlanError(f"blocks: position {bad[0]} out of range ({what})")


def _check_fits(model: nn.Module, step: _DepthStep) -> None:
    n = len(arch.decoder_blocks(model))
    _check_count(step, n, f"{n} blocks left in the model")


def shrink(model: nn.Module, step: _DepthStep, calibration: CalibrationData, report: list[dict] | None = None) -> nn.Module:
    """Take `step.num_out` blocks out of `model` in place, one at a time; append one dict per
    removed block to `report` (its original position, group, distillation losses)."""
    _check_fits(model, step)
    scoring = calibration.take(step.importance_samples)
    original = list(range(len(arch.decoder_blocks(model))))  # original position of each current block
    fuse = isinstance(step, FuseBlocksStep)
    order = None  # original positions in the order they go out; None: rescored before each one
    if step.blocks is not None:
        order = sorted(step.blocks, reverse=True)  # highest first: every lower position stays put
    elif not step.is_iterative():
        order = [original[i] for i in select_blocks(model, scoring, step.count, step.importance, batch_size=step.batch_size)]
    if order is not None and not fuse and step.steps == 0:  # plain one-shot removal: all at once
        arch.remove_blocks(model, order)
        if report is not None:
            report.extend({"removed": i} for i in order)
        return model
    for k in range(step.num_out):
        if order is None:
            position = select_blocks(model, scoring, 1, step.importance, batch_size=step.batch_size)[0]
        else:
            position = original.index(order[k])
        if fuse:
            stats = fuse_block(model, position, calibration, step.rank, step.group_size, step.distill_settings())
            if step.fold_each:
                fold_fused(model)
        elif step.steps > 0:
            stats = heal_block_removal(model, position, calibration, step.group_size, step.distill_settings())
        else:
            arch.remove_blocks(model, [position])
            stats = {"removed": position}
        stats["removed"] = original.pop(position)
        log.info("%s %d/%d: %s", step.op, k + 1, step.num_out, stats)
        if report is not None:
            report.append(stats)
    return fold_fused(model) if fuse else model


def removed_shape(skeleton: nn.Module, step: _DepthStep) -> nn.Module | None:
    """Shapes after taking `step.count` blocks out (fusion folds into the kept blocks, so it
    leaves the same shapes as removal). Which blocks go depends on the data, so the count is
    known only while every block has the same size (None otherwise, e.g. after per-layer widths),
    or when the step names its blocks."""
    _check_fits(skeleton, step)
    if step.blocks is not None:
        return arch.remove_blocks(skeleton, step.blocks)
    blocks = arch.decoder_blocks(skeleton)
    if len({sum(p.numel() for p in b.parameters()) for b in blocks}) > 1:
        return None
    n = len(blocks)
    return arch.remove_blocks(skeleton, range(n - step.count, n))


@register_op("remove_blocks", RemoveBlocksStep, reshape=removed_shape)
def remove_blocks(model: nn.Module, step: RemoveBlocksStep, calibration: CalibrationData) -> nn.Module:
    return shrink(model, step, calibration)


@register_op("fuse_blocks", FuseBlocksStep, reshape=removed_shape)
def fuse_blocks(model: nn.Module, step: FuseBlocksStep, calibration: CalibrationData) -> nn.Module:
    return shrink(model, step, calibration)
