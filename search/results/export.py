"""Export candidates of a run as ordinary Hugging Face model directories.

Each export holds: config.json (with any changed fields), safetensors weights, tokenizer,
generation config, a README.md model card (lineage, recipe, dev and test scores) and
`evofuse_recipe.json` (the candidate's recipe, plan and the recipes of its ancestors back to
the parents). It loads with plain `AutoModelForCausalLM.from_pretrained`.

Any journalled candidate exports, not only kept ones: a population / hall-of-fame member from
its stored weights, a parent from its directory, any other candidate by replaying its recipe
from the parents and stored members (recursively through journalled ancestors; the same bits,
as recipes are deterministic). When one cannot, the error says why.

Export never deletes what it did not write. The model is written into a temporary directory
beside the target and renamed into place, so a target is complete or absent (a kill mid-export
leaves only a `.NAME.*.tmp` directory, removed on resume). `check_export_target` refuses, before
any work, a target that is a file, a non-empty directory (with `force`: only an earlier evofuse
export, which is then replaced), or a path inside, equal to or containing a run directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from search.config import ConfigError, load_config
from search.run import faults
from search.run.candidate import format_score
from search.run.store import TEMP_SUFFIX, RunStore, fsync_dir

RECIPE_FILE = "evofuse_recipe.json"  # written last: its presence marks a complete export


def _journal_by_id(store: RunStore) -> dict[str, dict[str, dict]]:
    entries: dict[str, dict[str, dict]] = {}
    for entry in store.read_journal():
        entries.setdefault(entry["id"], {})[entry["split"]] = entry
    return entries


def lineage(member_id: str, journal: dict[str, dict[str, dict]], parents: set[str]) -> list[dict]:
    """Recipes from this member back to the parents, nearest first."""
    out, todo, seen = [], [member_id], set()
    while todo:
        mid = todo.pop(0)
        if mid in seen or mid in parents or mid not in journal:
            continue
        seen.add(mid)
        recipe = journal[mid]["dev"]["recipe"]
        out.append({"id": mid, "recipe": recipe})
        todo.extend(recipe.get("inputs", []) + ([recipe["base"]] if recipe.get("base") else []))
    return out


def ranked_members(state: dict) -> list[dict]:
    """Population and hall of fame, best dev score first, each id once."""
    members = {m["id"]: m for m in state["hall_of_fame"] + state["population"]}
    return sorted(members.values(), key=lambda m: m["score"], reverse=True)


def member_weights(store: RunStore, state: dict, member_id: str, parent_dirs: dict[str, Path],
                   journal: dict[str, dict[str, dict]] | None = None, config=None) -> dict[str, torch.Tensor]:
    """A candidate's weights: a parent's, a stored member's, or its recipe replayed."""
    from search.models.sources import load_state

    if member_id in parent_dirs:
        return load_state(parent_dirs[member_id])
    checksum = state["weight_checksums"].get(member_id)
    if checksum is not None:
        return store.load_weights(member_id, checksum)
    journal = _journal_by_id(store) if journal is None else journal
    config = load_config(store.config_path) if config is None else config
    return Replay(store, state, parent_dirs, journal, list(config.evolver.exclude)).weights(member_id)


class Replay:
    """Weights of journalled candidates, made from their recipes as the driver made them (CPU,
    float32 inputs): from parents, stored members and, recursively, other journalled candidates."""

    def __init__(self, store: RunStore, state: dict, parent_dirs: dict[str, Path], journal: dict, exclude: list[str]):
        self.store, self.state, self.parent_dirs, self.journal, self.exclude = store, state, parent_dirs, journal, exclude
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.names: list[str] | None = None

    def recipe_of(self, weights_id: str, wanted_by: str):
        from evolve.recipe import Recipe

        row = self.journal.get(weights_id, {}).get("dev")
        if row is None:
            raise ConfigError(
                f"--id {wanted_by}: its recipe reads {weights_id!r}, which is not a parent, a stored member or a "
                f"journalled candidate of {self.store.root}" if weights_id != wanted_by else
                f"--id {wanted_by}: no candidate {wanted_by!r} in {self.store.journal_path} (and not a parent)"
            )
        return Recipe.from_dict(row["recipe"])

    def weights(self, weights_id: str, wanted_by: str | None = None, depth: int = 0) -> dict[str, torch.Tensor]:
        from evolve.materialize import materialize
        from search.models.sources import load_state

        wanted_by = wanted_by or weights_id
        if weights_id in self.cache:
            return self.cache[weights_id]
        if weights_id in self.parent_dirs:  # as published to the workers: float32
            weights = {k: v.to(torch.float32) for k, v in load_state(self.parent_dirs[weights_id]).items()}
        elif weights_id in self.state["weight_checksums"]:
            weights = self.store.load_weights(weights_id, self.state["weight_checksums"][weights_id])
        else:
            if depth > 10_000:
                raise ConfigError(f"--id {wanted_by}: its lineage does not end at the parents (a cycle in the journal)")
            recipe = self.recipe_of(weights_id, wanted_by)
            inputs = {i: self.weights(i, wanted_by, depth + 1) for i in recipe.input_ids()}
            weights = materialize(recipe, inputs, self.tensor_names(), self.exclude)
        self.cache[weights_id] = weights
        return weights

    def tensor_names(self) -> list[str]:
        if self.names is None:
            from search.models.sources import tensor_index

            self.names = sorted(tensor_index(next(iter(self.parent_dirs.values()))))
        return self.names


def exportable(member_id: str, state: dict, journal: dict[str, dict[str, dict]], parent_dirs: dict[str, Path], run_dir) -> dict:
    """The member record (id, score, recipe, plan) of any candidate of the run, or why not."""
    members = {m["id"]: m for m in ranked_members(state)}
    if member_id in members:
        return members[member_id]
    if member_id in parent_dirs:
        return {"id": member_id, "score": state["parents"][member_id]["score"], "recipe": None}
    row = journal.get(member_id, {}).get("dev")
    if row is None:
        known = ", ".join(sorted(members)[:5])
        raise ConfigError(f"--id {member_id}: not a candidate of {run_dir} (no such id in its journal; e.g. {known})")
    if row.get("status") != "ok":
        raise ConfigError(f"--id {member_id}: its evaluation {row.get('status')} ({row.get('reason') or 'no reason recorded'}); "
                          "there is no working model to export")
    return {"id": member_id, "score": row.get("score"), "recipe": row.get("recipe"), "plan": row.get("plan") or []}


def structure_section(plan: list[dict], num_params: int | None, dense_params: int | None, structured: bool) -> list[str]:
    """The card's account of a compressed candidate: its size, its plan step by step, and how
    it loads (`structured`: it carries `evofuse_structure.json`, its layers differ in shape)."""
    from compression.loader import STRUCTURE_FILE
    from search.results.report import step_summary

    size = f"{num_params:,} parameters" if num_params else "Its parameters are not recorded"
    if num_params and dense_params:
        size += f", {100 * num_params / dense_params:.1f}% of the dense model's {dense_params:,}"
    loading = (f"Its layers differ in shape, so plain `AutoModelForCausalLM.from_pretrained` refuses it: load it with "
               f"`compression.loader.load_compressed(DIR)`, which reads `{STRUCTURE_FILE}`."
               if structured else "It loads with plain `AutoModelForCausalLM.from_pretrained`.")
    return ["## Structure", "", f"{size}. Its compression plan, step by step:", "",
            *(f"- {step_summary(step)}" for step in plan), "", loading, ""]


def model_card(member: dict, entries: dict[str, dict], config, ancestry: list[dict],
               structure: list[str] = ()) -> str:
    rows = []
    for task in config.tasks:
        dev = entries.get("dev", {}).get("metrics", {}).get(task.name, {})
        test = entries.get("test", {}).get("metrics", {}).get(task.name, {})
        rows.append(f"| {task.name} | {task.kind} | {_fmt(dev)} | {_fmt(test)} |")
    parents = ", ".join(p.name for p in config.parents.all())
    return "\n".join(
        [
            f"# {config.name} / {member['id']}",
            "",
            f"Made by evofuse in run `{config.name}` (seed {config.seed}) "
            f"from the parents {parents}. Dev-set aggregate score: {format_score(member['score'], '.6g')}.",
            "Dev scores selected this candidate; test scores were recorded, never used to select.",
            "",
            "| task | kind | dev | test |",
            "|---|---|---|---|",
            *rows,
            "",
            *structure,
            "## Recipe",
            "```json",
            json.dumps(member.get("recipe"), indent=1),
            "```",
            "",
            f"Lineage (nearest first): {' <- '.join(a['id'] for a in ancestry) or member['id']}",
            "",
        ]
    )


def _fmt(metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k in ("token_perplexity", "acc", "acc_norm", "exact_match", "score")}
    return ", ".join(f"{k} {format_score(v, '.4g')}" for k, v in shown.items()) or "-"


def export_member(run_dir: Path, member_id: str, out: Path, dtype: str = "float32", quiet: bool = True,
                  replace: bool = False) -> Path:
    """Export one candidate to `out` (written beside it, then renamed into place). `replace`:
    an earlier export at `out` is replaced; anything else there is refused (CLI: --force)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from search.models.experts import resolve_parents

    hf_logging.disable_progress_bar()
    store = RunStore(run_dir)
    state = store.read_state()
    if state is None:
        raise ConfigError(f"{run_dir}: no state.json (the run has not finished its first evaluations)")
    config = load_config(store.config_path)
    journal = _journal_by_id(store)
    parent_dirs = resolve_parents(config, quiet=quiet)
    member = exportable(member_id, state, journal, parent_dirs, run_dir)
    out = Path(out)
    check_target(out, force=replace)
    base_dir = parent_dirs[config.parents.base.name]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, trust_remote_code=False)
    params = model.state_dict(keep_vars=True)
    recipe = member.get("recipe") or {}
    source = recipe["inputs"][0] if recipe.get("op") == "copy" and recipe["inputs"][0] in parent_dirs else member_id
    for name, tensor in member_weights(store, state, source, parent_dirs, journal, config).items():
        params[name].data.copy_(tensor)
    ancestry = lineage(member_id, journal, set(parent_dirs))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TEMP_SUFFIX, dir=out.parent))
    os.chmod(tmp, 0o755)  # an ordinary directory once renamed
    try:
        if member.get("plan"):
            model = apply_member_plan(model, tokenizer, member["plan"], config)
            save_model(model.to(getattr(torch, dtype)), tokenizer, tmp)
        else:
            model.to(getattr(torch, dtype)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        entries = journal.get(member_id, {})
        record = {
            "id": member_id,
            "run": config.name,
            "seed": config.seed,
            "recipe": member.get("recipe"),
            "plan": member.get("plan") or [],
            "lineage": ancestry,
            "parents": {name: str(path) for name, path in parent_dirs.items()},
            "dev": entries.get("dev", {}).get("metrics"),
            "test": entries.get("test", {}).get("metrics"),
            "dev_score": member["score"],
            "dtype": dtype,
        }
        structure = []
        if member.get("plan"):
            from compression.loader import STRUCTURE_FILE

            dense = state.get("dense_params") if state else None
            structure = structure_section(member["plan"], sum(p.numel() for p in model.parameters()), dense,
                                          (tmp / STRUCTURE_FILE).is_file())
        (tmp / "README.md").write_text(model_card(member, entries, config, ancestry, structure))
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=1))
        _fsync_tree(tmp)
        faults.kill_point("export.write")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    faults.kill_point("export.rename")
    return out


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export over `out`: absent, an empty directory, or an earlier export
    (moved aside first, removed after)."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TEMP_SUFFIX, dir=out.parent))
        os.replace(out, old)  # onto the empty directory mkdtemp made
    elif out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_export(path: Path) -> bool:
    """An evofuse export directory (what `export` wrote, so what `--force` may replace)."""
    return (Path(path) / RECIPE_FILE).is_file()


def check_target(out: Path, force: bool = False) -> None:
    """One model directory to write: absent, empty, or (with `force`) an earlier export."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out}: not empty (export never overwrites; choose an empty or new directory, or --force to replace an earlier export)")
        if not is_export(out):
            raise ConfigError(f"--out {out}: not empty and not an earlier evofuse export (--force only replaces exports)")


def check_export_target(run_dir: Path, out: Path, ids: list[str] | None, force: bool = False) -> None:
    """Before any work: `out` (with `ids`: `out/<id>` for each) is not a file, not inside, equal
    to or around a run directory, and each model directory is absent, empty or (`force`) an
    earlier export."""
    out, run = Path(out), Path(run_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    resolved = out.resolve()
    for place in [resolved, *resolved.parents]:
        if place == run or _is_run_dir(place):
            what = "the run directory" if place == resolved else f"inside the run directory {place}"
            raise ConfigError(f"--out {out}: is {what} (exports go outside any run directory)")
    targets = [out / i for i in ids] if ids is not None else [out]
    for target in targets:
        if target.resolve() in run.parents or target.resolve() == run:
            raise ConfigError(f"--out {target}: holds the run directory {run_dir}")
        check_target(target, force)


def _is_run_dir(path: Path) -> bool:
    store = RunStore(path)
    return store.config_path.is_file() and (store.state_path.is_file() or store.journal_path.is_file() or store.identity_path.is_file())


def apply_member_plan(model, tokenizer, plan: list, config):
    """The candidate's structure: its plan applied with the run's calibration data, as scored."""
    from search.models.datasets import calibration_windows
    from compression.plan import apply_plan, parse_plan

    c = config.compress.space.calibration
    calibration = calibration_windows(tokenizer, c.data, c.seq_len, c.num_sequences)
    return apply_plan(model, parse_plan(plan), calibration).eval()


def save_model(model, tokenizer, out: Path) -> None:
    """Plain save_pretrained when the structure allows it, else compression's loader format."""
    try:
        from compression.loader import save_compressed
    except ImportError:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return
    save_compressed(model, tokenizer, out)


def export_top(run_dir: Path, top: int, out: Path, dtype: str = "float32", quiet: bool = True, replace: bool = False) -> list[Path]:
    store = RunStore(run_dir)
    state = store.read_state()
    if state is None:
        raise ConfigError(f"{run_dir}: no state.json to export from")
    return [export_member(Path(run_dir), m["id"], Path(out) / m["id"], dtype, quiet, replace) for m in ranked_members(state)[:top]]


def top_ids(run_dir: Path, top: int) -> list[str]:
    state = RunStore(run_dir).read_state()
    if state is None:
        raise ConfigError(f"{run_dir}: no state.json to export from")
    return [m["id"] for m in ranked_members(state)[:top]]
