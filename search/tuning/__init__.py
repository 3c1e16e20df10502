"""Optuna: the plan search space (`space`), the study in the run directory (`study`) and the
planner that asks plans against the size budget (`planner`)."""

__all__ = ["planner", "space", "study"]
