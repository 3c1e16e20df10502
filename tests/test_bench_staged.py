"""The staged benchmark writes its table again on every run; the notes under it survive. Each
pair's runs differ only in their scoring, and `--set` reaches both."""

from benchmarks.bench_staged import kept_notes, variant_config


def test_the_paragraphs_under_the_table_are_kept_and_the_table_is_not(tmp_path):
    results = tmp_path / "staged.md"
    results.write_text("# Staged fitness\n\n| run | judged |\n|---|---|\n| a | 384 |\n| b | 256 |\n\n"
                       "The `a` row: seed 0, alone on a 2-core VM.\n\n| a note's own | table |\n|---|---|\n")
    notes = kept_notes(results)
    assert notes == "\nThe `a` row: seed 0, alone on a 2-core VM.\n\n| a note's own | table |\n|---|---|\n"
    assert "| a | 384 |" not in notes


def test_a_table_without_notes_or_no_file_keeps_nothing(tmp_path):
    results = tmp_path / "staged.md"
    assert kept_notes(results) == ""
    results.write_text("# Staged fitness\n\n| run | judged |\n|---|---|\n| a | 384 |\n")
    assert kept_notes(results) == ""


def test_a_pairs_runs_differ_in_scoring_alone_and_overrides_reach_both():
    raw = {"name": "demo", "seed": 0, "export_top": 1, "workers": {"count": 2},
           "fitness": {"stages": [0.0625, 1.0], "audit": 0.05}, "evolver": {"generations": 4, "offspring_per_member": 24}}
    overrides = ["workers.num_gpus=0.125", "workers.num_cpus=2"]
    staged = variant_config(raw, "merge-staged-s1", 1, False, None, overrides)
    full = variant_config(raw, "merge-full-s1", 1, True, 12, overrides)
    for run in (staged, full):
        assert run["workers"] == {"count": 2, "num_gpus": 0.125, "num_cpus": 2}
        assert run["seed"] == 1 and run["export_top"] == 0
    assert staged["fitness"] == raw["fitness"] and staged["evolver"] == raw["evolver"]
    assert full["fitness"] == {"stages": [1.0]} and full["evolver"] == {"generations": 12, "offspring_per_member": 1}
    assert raw["workers"] == {"count": 2} and raw["name"] == "demo", "the pair's config is left as it was"
    # an override is applied last: it can change what full scoring set
    assert variant_config(raw, "f", 0, True, None, ["evolver.offspring_per_member=2"])["evolver"]["offspring_per_member"] == 2
