"""Starting and resuming a run directory: every check before any worker starts, one driver at
a time, a repaired directory after a kill, and a clean end state on any exit the driver controls.

`start_search` checks the config and every task's data (search.config.check_tasks) before it
creates anything, takes the run's lock (search.run.lock.RunLock: a second driver exits 2 naming
the holder's pid), then writes `identity.json` (the resolved config's fingerprint) and
`config.yaml`, each atomically: from then on the config is the run's identity, and
`resume_search` refuses a changed one, before or after the first checkpoint.

`resume_search` refuses a corrupt checkpoint, journal or weights file and an unwritable
directory before Ray starts, takes the lock, and repairs what a kill left behind (torn log lines,
temporary files, logbook lines and weights files newer than the checkpoint;
`RunStore.repair`), so the resumed run ends exactly where an uninterrupted one would.

`run_search` records how a run that stops early ended: state `interrupted` (Ctrl-C, SIGTERM)
or `failed` (an error), with the reason; bad input changes nothing. A SIGKILLed driver cannot
record anything: `status` tells it from a running one by the lock (no holder: the driver is gone).
"""
from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError
from tqdm.auto import tqdm

from search.config import ConfigError, RunConfig, check_tasks, dump_config, identity_hash, identity_part, load_config
from search.errors import BAD_INPUT, EvofuseError, one_line
from search.run.scoring import RunFailed, check_generation  # noqa: F401  (re-exported)
from search.run.store import CorruptRunError, RunDirError, RunStore


def default_run_dir(config: RunConfig) -> Path:
    return Path(config.run_dir) if config.run_dir else Path("runs") / config.name


def start_search(config_path: str | Path, run_dir: str | Path | None = None, *, address=None, workers=None, quiet=False,
                 overrides: Sequence[str] = ()) -> Path:
    """Start a run of the config at `config_path` (with `overrides`, `KEY=VALUE` each: `--set`).
    The run directory's config.yaml records the config as run, overrides applied, so a resume
    needs none of them."""
    config = with_workers(load_config(config_path, overrides), workers)
    check_tasks(config)
    decide_screen_dtype(config, quiet)
    root = Path(run_dir) if run_dir else default_run_dir(config)
    store = RunStore(root)
    _check_new_run_dir(store)
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{root}: cannot create the run directory ({exc.strerror})") from None
    written = False
    try:
        store.check_writable()
        store.lock()
        _check_new_run_dir(store)  # again, under the lock: another start may have won the race
        store.remove_temporaries()
        config.run_dir = str(root)
        store.write_identity(config.fingerprint(), config.model_dump(mode="json", exclude={"run_dir"}))
        store.write_config(dump_config(config))
        written = True
        return run_search(config, store, address, quiet)
    except BAD_INPUT:
        if written and not (store.journal_path.exists() or store.state_path.exists()):
            _undo_start(store, created)  # bad input found before any evaluation: leave no run behind
        raise


def decide_screen_dtype(config: RunConfig, quiet: bool) -> None:
    """Writes `fitness.screen_dtype: auto` as what this machine decides (the run's config then
    holds it, so a resume elsewhere screens as the run began), and says when an explicit
    bfloat16 screen will be emulated on this CPU."""
    from search.run.stages import native_bfloat16_cpu, resolved_screen_dtype

    fitness, workers = config.fitness, config.workers
    if fitness.screen_dtype == "bfloat16" and workers.num_gpus == 0 and not native_bfloat16_cpu():
        tqdm.write("fitness.screen_dtype: bfloat16 on a CPU that emulates it (no AVX-512 BF16 or AMX): screens cost more "
                   "than in float32 here; `auto` decides by the CPU", file=sys.stderr)
    elif fitness.screen_dtype == "auto":
        fitness.screen_dtype = resolved_screen_dtype(config)
        if not quiet:
            chosen = fitness.screen_dtype or "none (the workers' own dtype)"
            tqdm.write(f"fitness.screen_dtype: auto -> {chosen}", file=sys.stderr)


def _undo_start(store: RunStore, created: bool) -> None:
    for path in (store.config_path, store.identity_path, store.lock_path):
        path.unlink(missing_ok=True)
    if created:
        shutil.rmtree(store.root, ignore_errors=True)


def _check_new_run_dir(store: RunStore) -> None:
    root = store.root
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{root}: not a directory (--run-dir / the run name must name a directory)")
    if store.exists():
        raise ConfigError(f"{root}: a run is already there (use `evofuse resume {root}`, or another --run-dir)")
    if root.is_dir() and not store.leftovers_only():
        raise RunDirError(f"{root}: not empty and not a run directory (choose another --run-dir)")


def resume_search(run_dir: str | Path, *, config_path: str | Path | None = None, address=None, quiet=False,
                  workers: int | None = None, overrides: Sequence[str] = ()) -> Path:
    """Go on with the run in `run_dir` from its checkpoint and journal. `workers` and `overrides`
    (`--workers`, `--set`) may change who computes it, nothing that changes its results."""
    store = RunStore(run_dir)
    recorded, state = check_run(store, config_path)
    config = with_resume_settings(store, recorded, workers, overrides)
    check_tasks(config)
    store.check_writable()
    store.lock()
    if config is not recorded:
        store.write_config(dump_config(config))  # the run's record says how it goes on
    state = store.read_state()  # under the lock: what the last driver left
    store.repair(state)
    return run_search(config, store, address, quiet, verified=True)


RESUME_SETTINGS = "workers.count, workers.address and workers.recipe_stats_gib"  # config.NOT_IDENTITY; cli's resume --set help


def with_resume_settings(store: RunStore, config: RunConfig, workers: int | None, overrides: Sequence[str]) -> RunConfig:
    """The run's config with a resume's `--set` overrides and `--workers` applied; an override of a
    field that changes results (anything in the run's identity) is refused, naming it."""
    if workers is None and not overrides:
        return config
    changed = load_config(store.config_path, overrides) if overrides else config.model_copy(deep=True)
    if changed.fingerprint() != config.fingerprint():
        raise ConfigError(f"--set: {changed_field(config, changed)} would change the run's results; a resume can change "
                          f"only {RESUME_SETTINGS} (start a new run for the rest)")
    return with_workers(changed, workers)


def with_workers(config: RunConfig, workers: int | None) -> RunConfig:
    """`config` with `--workers` actors (None: as configured)."""
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {workers}")
        config.workers.count = workers
    return config


def check_run(store: RunStore, config_path: str | Path | None = None, weights: bool = True) -> tuple[RunConfig, dict | None]:
    """(config, checkpoint) of a run directory, refused with one line when the config changed
    since the run started, or the checkpoint, journal or (`weights`) weights files are corrupt.
    Reads only."""
    run_dir = store.root
    if not store.root.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not store.config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(store.config_path)
    identity = store.read_identity()
    if identity is not None and not started_as(identity, config):
        raise ConfigError(f"{store.config_path}: changed since the run started ({changed_since(identity, config)}); "
                          "restore it or start a new run")
    if config_path is not None:
        given = load_config(config_path)
        if given.fingerprint() != config.fingerprint():
            raise ConfigError(f"{config_path}: differs from the config {run_dir} was started with ({changed_field(config, given)})")
    state = store.read_state()
    if state is not None:
        # A checkpoint of an earlier evofuse carries that version's fingerprint, which the
        # identity (checked above) vouches for; this version's checkpoints carry its own.
        fingerprints = {config.fingerprint()} | ({identity["fingerprint"]} if identity is not None else set())
        if state.get("fingerprint") not in fingerprints:
            raise ConfigError(f"{store.config_path}: changed since the run started; restore it or start a new run")
        if weights:
            store.verify_weights(state.get("weight_checksums", {}))
    store.check_journal(state)
    return config, state


def started_as(identity: dict, config: RunConfig) -> bool:
    """Whether `config` is the config a run with this identity started with.

    An earlier evofuse fingerprinted its own dump of the config, which lacks every field added
    since. A new field's default keeps the behaviour from before it existed (as it does for a
    config file written before it), so such an identity still fits when its stored config is
    what its fingerprint was taken of and, read by this version, fingerprints as `config` does.
    """
    if identity["fingerprint"] == config.fingerprint():
        return True
    original = identity.get("config")
    if not isinstance(original, dict) or identity_hash(original) != identity["fingerprint"]:
        return False
    try:
        return RunConfig.model_validate(original).fingerprint() == config.fingerprint()
    except ValidationError:  # a field this version no longer knows, or a value it refuses
        return False


def changed_since(identity: dict, config: RunConfig) -> str:
    """What `changed_field` names between a run's identity and `config`, or why it cannot."""
    original = identity.get("config")
    if not isinstance(original, dict):
        return "fingerprint"
    try:
        found = changed_field(RunConfig.model_validate(original), config)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "config"
        return f"identity.json's {where}: {error['msg']}, as this evofuse reads it"
    return "identity.json's fingerprint is not of its config" if found == "unknown field" else found


def changed_field(old: RunConfig, new: RunConfig) -> str:
    """The first field (dotted path) whose value differs between two configs."""

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                found = walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
                if found:
                    return found
            return None
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return next((found for i, (a, b) in enumerate(zip(x, y)) if (found := walk(a, b, f"{path}[{i}]"))), None)
        return None if x == y else f"{path}: {x!r} -> {y!r}"

    return walk(identity_part(old.model_dump(mode="json")), identity_part(new.model_dump(mode="json")), "") or "unknown field"


def run_search(config: RunConfig, store: RunStore, address, quiet: bool, verified: bool = False) -> Path:
    """Run (or go on with) the search in `store`, holding its lock; `verified`: the checkpoint's
    weights were checked already (`check_run`)."""
    from search.run.loop import Search

    store.lock()
    state = store.read_state()  # a corrupt checkpoint is refused before anything starts
    if state is not None:
        if not verified:
            store.verify_weights(state["weight_checksums"])
        if state["status"] == "finished":
            tqdm.write(f"{store.root}: already finished", file=sys.stderr)
            return store.root
        if state["status"] != "running":  # stopped before: running again from this checkpoint
            store.write_state({k: v for k, v in state.items() if k != "stopped"} | {"status": "running"})
    search = Search(config, store, address=address, quiet=quiet)
    restore = lambda: None  # noqa: E731
    try:
        search.start()
        restore = _terminate_as_interrupt()  # after Ray's start, which installs its own handler
        search.run()
    except BAD_INPUT:
        raise  # bad input changes nothing in the run directory
    except BaseException as exc:
        record_stop(store, exc)
        raise
    finally:
        search.shutdown()
        restore()
    return store.root


def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the driver, so it ends as cleanly as Ctrl-C; returns
    the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def record_stop(store: RunStore, exc: BaseException) -> None:
    """Mark the checkpoint `interrupted` or `failed`, with the reason (`resume` goes on from it)."""
    try:
        state = store.read_state()
        if state is None or state.get("status") != "running":
            return
        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
        reason = one_line(exc) if str(exc) else type(exc).__name__
        store.write_state({**state, "status": status, "stopped": {"reason": reason, "time": time.time()}})
    except Exception:  # never hide the original error behind one about recording it
        pass


def export_after_run(root: Path, quiet: bool = False) -> list[Path]:
    """A finished run's `export_top` best candidates, exported into `exports/` (called by the
    CLI after `search` / `resume`). An export is written into a temporary directory and renamed
    into place, so `exports/<id>/` is complete or absent; an absent one (a kill mid-export) is
    written again."""
    from search.results.export import export_member, is_export, ranked_members

    store = RunStore(root)
    config, state = load_config(store.config_path), store.read_state()
    if not config.export_top or state is None or state["status"] != "finished":
        return []
    store.lock()
    paths = []
    for member in ranked_members(state)[: config.export_top]:
        out = store.exports_dir / member["id"]
        if not is_export(out):
            if out.exists():  # a partial export left by an older evofuse: the run's own, redone
                shutil.rmtree(out)
            export_member(Path(root), member["id"], out, quiet=quiet, replace=True)
        paths.append(out)
    return paths


__all__ = [
    "start_search", "resume_search", "run_search", "check_run", "default_run_dir", "changed_field",
    "export_after_run", "record_stop", "check_generation", "RunFailed", "EvofuseError", "CorruptRunError",
]
