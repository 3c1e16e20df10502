"""The rebuild profile counts, from a run's journal, the making time of planned candidates'
whole dev evaluations and of their test splits, and nothing else."""

from benchmarks.profile_rebuild import rebuild_seconds


def row(split, stage, seconds, plan=True, status="ok"):
    return {"split": split, "stage": stage, "status": status, "plan": [{"op": "prune_width"}] if plan else [],
            "timing": {"materialize_s": seconds, "score_s": 1.0}}


def test_full_dev_and_test_rebuilds_are_counted_apart_and_the_rest_is_not():
    rows = [
        row("dev", 0, 0.8),  # a KL first stage: made without reconstruction
        row("dev", 1, 25.0), row("dev", 1, 27.0), row("dev", 1, 26.0),
        row("test", None, 24.0), row("test", None, 28.0),
        row("test", None, 0.1, plan=False),  # a parent's test split: nothing to rebuild
        row("dev", None, 1.2, plan=False),  # a parent's dev scoring
        row("dev", 1, 30.0, status="stopped"),  # a stop's row repeats its stage's timing
    ]
    assert rebuild_seconds(rows) == {
        "full dev": {"jobs": 3, "median_s": 26.0, "sum_s": 78.0},
        "test split": {"jobs": 2, "median_s": 26.0, "sum_s": 52.0},
    }


def test_a_run_without_plans_has_no_rebuilds():
    assert rebuild_seconds([row("dev", None, 1.0, plan=False)]) == {
        "full dev": {"jobs": 0, "median_s": None, "sum_s": 0},
        "test split": {"jobs": 0, "median_s": None, "sum_s": 0},
    }
