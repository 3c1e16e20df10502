"""Starting and resuming a run directory: the checks before any worker starts.

`start_search` refuses a directory that already holds a run and writes the resolved config
first (atomically): from then on it is the run's identity, and `resume_search` refuses to go on
with a changed one. A corrupt checkpoint or weights file is refused before Ray starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from compression.loader import atomic_write_text

from search.config import ConfigError, RunConfig, dump_config, load_config
from search.run.loop import Search
from search.run.store import RunStore


def default_run_dir(config: RunConfig) -> Path:
    return Path(config.run_dir) if config.run_dir else Path("runs") / config.name


def start_search(config_path: str | Path, run_dir: str | Path | None = None, *, address=None, workers=None, quiet=False) -> Path:
    config = load_config(config_path)
    if workers:
        config.workers.count = workers
    root = Path(run_dir) if run_dir else default_run_dir(config)
    store = RunStore(root)
    if store.exists():
        raise ConfigError(f"{root}: a run is already there (use `evofuse resume {root}`, or another --run-dir)")
    root.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(root)
    atomic_write_text(store.config_path, dump_config(config))
    return run_search(config, store, address, quiet)


def resume_search(run_dir: str | Path, *, config_path: str | Path | None = None, address=None, quiet=False) -> Path:
    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(store.config_path)
    if config_path is not None:
        given = load_config(config_path)
        if given.fingerprint() != config.fingerprint():
            raise ConfigError(f"{config_path}: differs from the config {run_dir} was started with ({changed_field(config, given)})")
    state = store.read_state()
    if state is not None and state.get("fingerprint") != config.fingerprint():
        raise ConfigError(f"{store.config_path}: changed since the run started; restore it or start a new run")
    store.repair_logs()
    return run_search(config, store, address, quiet)


def changed_field(old: RunConfig, new: RunConfig) -> str:
    """The first field (dotted path) whose value differs between two configs."""

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                found = walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
                if found:
                    return found
            return None
        return None if x == y else f"{path}: {x!r} -> {y!r}"

    return walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "") or "unknown field"


def run_search(config: RunConfig, store: RunStore, address, quiet: bool) -> Path:
    state = store.read_state()  # a corrupt checkpoint is refused before anything starts
    if state is not None:
        store.verify_weights(state["weight_checksums"])
        if state["status"] == "finished":
            tqdm.write(f"{store.root}: already finished", file=sys.stderr)
            return store.root
    search = Search(config, store, address=address, quiet=quiet)
    try:
        search.start()
        search.run()
    finally:
        search.shutdown()
    return store.root


def export_after_run(root: Path, quiet: bool = False) -> list[Path]:
    """A finished run's `export_top` best candidates, exported into `exports/` (called by the
    CLI after `search` / `resume`). An export is complete once its `evofuse_recipe.json`, written
    last, exists; an incomplete one (a kill mid-export) is written again."""
    from search.results.export import export_member, ranked_members

    store = RunStore(root)
    config, state = load_config(store.config_path), store.read_state()
    if not config.export_top or state is None or state["status"] != "finished":
        return []
    paths = []
    for member in ranked_members(state)[: config.export_top]:
        out = store.exports_dir / member["id"]
        if not (out / "evofuse_recipe.json").is_file():
            export_member(Path(root), member["id"], out, quiet=quiet)
        paths.append(out)
    return paths


__all__ = ["start_search", "resume_search", "run_search", "default_run_dir", "changed_field", "export_after_run"]
