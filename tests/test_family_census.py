"""benchmarks/family_census.py: replaying sibling-selection rules on hand-made whole families."""
import pytest

from benchmarks.family_census import Rule, choose, judge, sample_families, smoothed_first, summarise, thinned

WEIGHTS = {"t": 1.0}


def examples(values: list[float]) -> dict:
    return {"t": {"index": list(range(len(values))), "value": values, "weight": [1.0] * len(values)}}


def offspring(cid: str, first: float, second: float, full_values: list[float], F: float = 0.5, CR: float = 0.5,
              reference: str = "m1") -> dict:
    return {"id": cid, "reference": reference, "F": F, "CR": CR, "first": first, "second": second,
            "full": sum(full_values) / len(full_values), "examples": examples(full_values)}


def family(children: list[dict], member_values: list[float]) -> dict:
    member = {"id": "m0", "full": sum(member_values) / len(member_values), "examples": examples(member_values)}
    return {"generation": 1, "member": member, "offspring": children}


def test_two_steps_take_the_first_stage_best_then_the_second_stage_best_to_full():
    children = [offspring("a", 0.9, 0.1, [0.5] * 8), offspring("b", 0.8, 0.7, [0.6] * 8),
                offspring("c", 0.7, 0.9, [0.9] * 8), offspring("d", 0.1, 0.99, [1.0] * 8)]
    assert choose(Rule("top 2 > 1", 2, 1), children) == (["b"], "b")  # c meets the second stage only with k1 = 3
    assert choose(Rule("top 3 > 1", 3, 1), children) == (["c"], "c")
    assert choose(Rule("top 3 > 2", 3, 2), children) == (["c", "b"], "c")  # the better of two in full
    assert choose(Rule("top 1", None, 1), children) == (["a"], "a")


def test_a_stop_is_false_when_its_full_score_reaches_the_member_and_the_chosen_one():
    children = [offspring("a", 0.9, 0.9, [1.0, 0.0, 1.0, 0.0]),   # chosen: 0.5
                offspring("b", 0.5, 0.5, [1.0, 1.0, 1.0, 0.0]),   # 0.75: false, beats both
                offspring("c", 0.4, 0.4, [0.0, 0.0, 0.0, 0.0])]   # 0.0: a right stop
    outcome = judge(Rule("top 1", None, 1), family(children, [0.0, 1.0, 0.0, 0.0]), WEIGHTS, 0.9)
    assert outcome["chosen"] == "a" and outcome["stopped"] == 2 and outcome["false"] == 1
    assert outcome["regret"] == pytest.approx(0.25)
    # the member above every offspring: nothing stopped was false, nothing lost
    outcome = judge(Rule("top 1", None, 1), family(children, [1.0] * 4), WEIGHTS, 0.9)
    assert outcome["false"] == 0 and outcome["regret"] == 0.0


def test_only_a_lead_the_full_dev_sets_resolve_counts_as_resolved():
    many = 64
    clear = [1.0] * many  # ahead on every item of the chosen one's half
    close = [1.0] * (many // 2 + 1) + [0.0] * (many // 2 - 1)
    chosen = [1.0] * (many // 2) + [0.0] * (many // 2)
    children = [offspring("a", 0.9, 0.9, chosen), offspring("b", 0.1, 0.1, clear), offspring("c", 0.1, 0.1, close)]
    outcome = judge(Rule("top 1", None, 1), family(children, [0.0] * many), WEIGHTS, 0.9)
    assert outcome["false"] == 2 and outcome["resolved"] == 1


def test_smoothing_recovers_a_quadratic_in_the_step_sizes_under_noise():
    steps = [(f / 10, cr / 10) for f in range(1, 10, 2) for cr in range(1, 10, 2)]
    truth = [-(f - 0.6) ** 2 - 0.5 * (cr - 0.3) ** 2 for f, cr in steps]
    noise = [0.02 if k % 2 else -0.02 for k in range(len(steps))]
    children = [offspring(f"o{k}", t + e, 0.0, [0.0], F=f, CR=cr) for k, ((f, cr), t, e) in enumerate(zip(steps, truth, noise))]
    fitted = smoothed_first(children)
    assert max(abs(a - b) for a, b in zip(fitted, truth)) < 0.02  # closer to the truth than any noisy score
    assert max(range(len(steps)), key=fitted.__getitem__) == max(range(len(steps)), key=truth.__getitem__)


def test_families_are_sampled_across_generations_reproducibly():
    keys = [(g, f"m{i}") for g in range(4) for i in range(4)]
    chosen = sample_families(keys, 6, seed=0)
    assert sorted({g for g, _ in chosen}) == [0, 1, 2, 3] and len(set(chosen)) == 6
    assert chosen == sample_families(keys, 6, seed=0) and chosen != sample_families(keys, 6, seed=1)
    assert len(sample_families(keys, 40, seed=0)) == 16


def test_costs_count_every_screen_and_full_scoring_pays_none():
    children = [offspring(f"o{k}", k / 10, k / 10, [k / 10], F=k / 10) for k in range(4)]
    costs = {"first": 1.0, "second": 2.0, "full": 10.0}
    staged = summarise(Rule("top 2 > 1", 2, 1), [family(children, [0.0])], WEIGHTS, 0.9, costs)
    assert staged["actor_s_per_family"] == 4 * 1.0 + 2 * 2.0 + 10.0 and staged["speedup"] == round(40 / 18, 2)
    assert staged["chosen"] == ["o3"] and staged["false"] == 0
    assert summarise(Rule("all in full", None, 4), [family(children, [0.0])], WEIGHTS, 0.9, costs)["speedup"] == 1.0


def test_thinning_keeps_every_other_offspring_by_step_size():
    children = [offspring(f"o{k}", 0.0, 0.0, [0.0], F=f) for k, f in enumerate([0.7, 0.1, 0.5, 0.3])]
    assert [o["F"] for o in thinned(family(children, [0.0]), 2)["offspring"]] == [0.1, 0.5]
