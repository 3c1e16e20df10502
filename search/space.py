"""The plan search space Optuna explores, and how a trial becomes a compression plan.

A plan has up to three steps, each chosen by a categorical parameter that may be "none":
a depth step (remove or fuse blocks), a width step (prune heads / FFN neurons with a
reconstruction) and a tensor-train step (TTM MLPs). Their parameters are suggested only when
the step is chosen (define-by-run), so NSGA-II / TPE see a conditional space. Ranges are
`[low, high]` pairs; integer ranges marked log are sampled on a log scale.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntRange(Strict):
    low: int = Field(ge=1)
    high: int = Field(ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class FloatRange(Strict):
    low: float = Field(gt=0, lt=1)
    high: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class CalibrationConfig(Strict):
    data: str = "pydoc:train"
    seq_len: int = Field(128, ge=8)
    num_sequences: int = Field(32, ge=1)


class SpaceConfig(Strict):
    depth: list[Literal["none", "remove_blocks", "fuse_blocks"]] = ["none", "remove_blocks"]
    block_count: IntRange = IntRange(low=1, high=4)
    importance: list[Literal["block_influence", "macro_influence", "sleb"]] = ["block_influence"]
    fuse_rank: IntRange = IntRange(low=4, high=64, log=True)
    fuse_steps: IntRange = IntRange(low=5, high=40)
    width: list[Literal["none", "prune_width"]] = ["none", "prune_width"]
    width_ratio: FloatRange = FloatRange(low=0.05, high=0.4)
    width_target: list[Literal["ffn", "heads", "both"]] = ["both"]
    criterion: list[str] = ["second_moment"]
    reconstruct: list[Literal["none", "liar", "greedy"]] = ["liar"]
    ttm: list[Literal["none", "ttm"]] = ["none"]
    ttm_rank: IntRange = IntRange(low=8, high=64, log=True)
    ttm_modules: str = "mlp"
    calibration: CalibrationConfig = CalibrationConfig()


def suggest_plan(trial, space: SpaceConfig, num_layers: int) -> list[dict]:
    """Ask the trial for one plan (a list of plan-step mappings, possibly empty)."""
    plan: list[dict] = []
    depth = trial.suggest_categorical("depth", space.depth)
    if depth != "none":
        high = min(space.block_count.high, num_layers - 1)
        step = {
            "op": depth,
            "count": trial.suggest_int("block_count", min(space.block_count.low, high), high),
            "importance": trial.suggest_categorical("importance", space.importance),
        }
        if depth == "fuse_blocks":
            step["rank"] = trial.suggest_int("fuse_rank", space.fuse_rank.low, space.fuse_rank.high, log=space.fuse_rank.log)
            step["steps"] = trial.suggest_int("fuse_steps", space.fuse_steps.low, space.fuse_steps.high)
        plan.append(step)
    if trial.suggest_categorical("width", space.width) != "none":
        plan.append(
            {
                "op": "prune_width",
                "ratio": round(trial.suggest_float("width_ratio", space.width_ratio.low, space.width_ratio.high), 4),
                "target": trial.suggest_categorical("width_target", space.width_target),
                "criterion": trial.suggest_categorical("criterion", space.criterion),
                "reconstruct": trial.suggest_categorical("reconstruct", space.reconstruct),
            }
        )
    if trial.suggest_categorical("ttm", space.ttm) != "none":
        rank = trial.suggest_int("ttm_rank", space.ttm_rank.low, space.ttm_rank.high, log=space.ttm_rank.log)
        plan.append({"op": "ttm", "rank": rank, "modules": space.ttm_modules})
    return plan
