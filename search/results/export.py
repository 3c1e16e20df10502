"""Export candidates of a run as ordinary Hugging Face model directories.

Each export holds: config.json (with any changed fields), safetensors weights, tokenizer,
generation config, a README.md model card (lineage, recipe, dev and test scores) and
`evofuse_recipe.json` (the candidate's recipe, plan and the recipes of its ancestors back to
the parents). It loads with plain `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from search.config import ConfigError, load_config
from search.run.store import RunStore


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


def member_weights(store: RunStore, state: dict, member_id: str, parent_dirs: dict[str, Path]) -> dict[str, torch.Tensor]:
    from search.models.sources import load_state

    if member_id in parent_dirs:
        return load_state(parent_dirs[member_id])
    member = next((m for m in ranked_members(state) if m["id"] == member_id), None)
    recipe = (member or {}).get("recipe") or {}
    if recipe.get("op") == "copy" and recipe["inputs"][0] in parent_dirs:  # a plan over a parent's weights
        return load_state(parent_dirs[recipe["inputs"][0]])
    checksum = state["weight_checksums"].get(member_id)
    if checksum is None:
        raise ConfigError(f"{store.root}: no stored weights for candidate {member_id!r} (only population and hall-of-fame members are kept)")
    return store.load_weights(member_id, checksum)


def model_card(member: dict, entries: dict[str, dict], config, ancestry: list[dict]) -> str:
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
            f"from the parents {parents}. Dev-set aggregate score: {member['score']:.6g}.",
            "Dev scores selected this candidate; test scores were recorded, never used to select.",
            "",
            "| task | kind | dev | test |",
            "|---|---|---|---|",
            *rows,
            "",
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
    return ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "-"


def export_member(run_dir: Path, member_id: str, out: Path, dtype: str = "float32", quiet: bool = True) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from search.models.experts import resolve_parents

    hf_logging.disable_progress_bar()
    store = RunStore(run_dir)
    state = store.read_state()
    if state is None:
        raise ConfigError(f"{run_dir}: no state.json (the run has not finished its first evaluations)")
    config = load_config(store.config_path)
    members = {m["id"]: m for m in ranked_members(state)}
    parent_dirs = resolve_parents(config, quiet=quiet)
    if member_id not in members and member_id not in parent_dirs:
        raise ConfigError(f"--id {member_id}: not a population, hall-of-fame or parent id of {run_dir}")
    member = members.get(member_id) or {"id": member_id, "score": state["parents"][member_id]["score"], "recipe": None}
    base_dir = parent_dirs[config.parents.base.name]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    params = model.state_dict(keep_vars=True)
    for name, tensor in member_weights(store, state, member_id, parent_dirs).items():
        params[name].data.copy_(tensor)
    journal = _journal_by_id(store)
    ancestry = lineage(member_id, journal, set(parent_dirs))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if out.exists():
        shutil.rmtree(out)
    if member.get("plan"):
        model = apply_member_plan(model, tokenizer, member["plan"], config)
        save_model(model.to(getattr(torch, dtype)), tokenizer, out)
    else:
        out.mkdir(parents=True)
        model.to(getattr(torch, dtype)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    entries = journal.get(member_id, {})
    recipe = {
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
    (out / "evofuse_recipe.json").write_text(json.dumps(recipe, indent=1))
    (out / "README.md").write_text(model_card(member, entries, config, ancestry))
    return out


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


def export_top(run_dir: Path, top: int, out: Path, dtype: str = "float32", quiet: bool = True) -> list[Path]:
    store = RunStore(run_dir)
    state = store.read_state()
    if state is None:
        raise ConfigError(f"{run_dir}: no state.json to export from")
    return [export_member(Path(run_dir), m["id"], Path(out) / m["id"], dtype, quiet) for m in ranked_members(state)[:top]]
