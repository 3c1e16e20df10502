"""The staged benchmark writes its table again on every run; the notes under it survive."""

from benchmarks.bench_staged import kept_notes


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
