"""The README's promises, kept (issue 18, items 8 and 9).

- Every command of the README's worked example runs verbatim, in order, on tiny models: the
  block under "## A worked example" is read from README.md, each line is split as a shell
  would (comments dropped, `best/*` globbed) and run through `search.cli.main` in a fresh
  directory holding only a link to `configs/`. Every file the block names exists.
- The mergekit parity claim says which methods and dtypes the tests cover, with each measured
  difference: every case of tests/test_mergekit_parity.py appears in the README's table.
"""
from __future__ import annotations

import glob
import json
import re
import shlex
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}.*$", text, re.MULTILINE)
    assert match, f"README.md has no section {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def example_commands(text: str) -> list[list[str]]:
    """The `evofuse ...` lines of the first code block of "A worked example", split as bash would
    split them (comments dropped; globs are expanded when run)."""
    block = re.search(r"```[a-z]*\n(.*?)```", section(text, "A worked example"), re.DOTALL)
    assert block, "the worked example has no code block"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert commands and all(c[0] == "evofuse" for c in commands), "every line of the block is an evofuse command"
    return commands


def expand(argv: list[str]) -> list[str]:
    """Glob each word as bash does: matches in order, or the word itself when nothing matches."""
    out = []
    for word in argv:
        matches = sorted(glob.glob(word)) if any(ch in word for ch in "*?[") else []
        out.extend(matches or [word])
    return out


@pytest.mark.slow
def test_every_command_of_the_worked_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    from search.cli import main

    commands = example_commands(README.read_text())
    verbs = [c[1] for c in commands]
    for verb in ("search", "status", "resume", "export", "report", "eval", "compress", "merge"):
        assert verb in verbs, f"the worked example shows no `evofuse {verb}`"
    big = [shlex.join(c) for c in commands if "smollm2-135m" in c]
    assert not big, f"the worked example runs on tiny models (minutes, not hours, on a CPU): {big[0] if big else ''}"
    test_every_file_the_worked_example_names_exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    timings = []
    for argv in commands:
        line = shlex.join(argv)
        start = time.perf_counter()
        capsys.readouterr()
        code = main(expand(argv[1:]))
        out, err = capsys.readouterr()
        timings.append((round(time.perf_counter() - start, 1), line))
        assert code == 0, f"`{line}` exited {code}: {err.strip().splitlines()[-1:] }"
        if "--json" in argv:
            json.loads(out)  # one JSON object on stdout and nothing else
    print("\n".join(f"{s:6.1f} s  {line}" for s, line in timings))
    assert (tmp_path / "runs" / "tiny" / "report" / "report.md").is_file()
    assert len(glob.glob("best/*/config.json")) == 1 and (tmp_path / "small" / "config.json").is_file()
    assert (tmp_path / "merged" / "mergekit_config.yml").is_file()


def test_every_file_the_worked_example_names_exists():
    for argv in example_commands(README.read_text()):
        for word in argv:
            if word.endswith((".yaml", ".yml")):
                assert (ROOT / word).is_file(), f"the worked example names {word}, which is not in the repository"


def test_the_mergekit_parity_claim_lists_each_covered_case_with_its_measured_difference():
    parity = (ROOT / "tests" / "test_mergekit_parity.py").read_text()
    cases = re.findall(r'^    "([a-z_0-9]+)": lambda p:', parity, re.MULTILINE)
    assert len(cases) >= 10
    text = section(README.read_text(), "Classic merges")
    for case in cases:
        row = re.search(rf"^\|\s*`?{case}`?\s*\|(.*)$", text, re.MULTILINE)
        assert row, f"README's Classic merges section has no row for the parity case {case}"
        numbers = re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", row.group(1))
        assert numbers, f"the row of {case} gives no measured difference"
    assert "float32" in text and "bfloat16" in text, "say which dtypes the parity covers and which it does not"
