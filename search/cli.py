"""The `evofuse` command line: one thin command per verb.

Exit codes: 0 ok, 2 bad input (one line on stderr naming the field or file), 1 anything else.
Long work shows progress bars on stderr; `--quiet` silences them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from search.errors import BAD_INPUT, RunFailed, one_line


# ---- verbs --------------------------------------------------------------------------------
def cmd_search(args) -> int:
    from search.run.session import export_after_run, start_search

    root = start_search(args.config, args.run_dir, address=args.address, workers=args.workers, quiet=args.quiet,
                        overrides=args.overrides)
    export_after_run(root, quiet=args.quiet)
    _print_summary(root, args.quiet)
    return 0


def cmd_resume(args) -> int:
    from search.run.session import export_after_run, resume_search

    root = resume_search(args.run_dir, config_path=args.config, address=args.address, quiet=args.quiet,
                         workers=args.workers, overrides=args.overrides)
    export_after_run(root, quiet=args.quiet)
    _print_summary(root, args.quiet)
    return 0


def cmd_status(args) -> int:
    from search.results.report import format_status, run_status
    from search.run.store import RunDirError, RunStore

    store = RunStore(args.run_dir)
    if not store.root.is_dir():
        raise RunDirError(f"{args.run_dir}: no such run directory")
    status = run_status(store.root)
    status.update(driver_status(store, status["status"]))
    print(json.dumps(status, indent=1) if args.json else format_status(status) + "\n" + format_driver(status))
    return 0


def driver_status(store, recorded: str) -> dict:
    """Who is running the run: the lock holder's pid, or none. A run recorded as running (or
    starting) with no lock holder was stopped by a kill or crash: its status says `stopped`."""
    pid = store.lock_holder()
    state = store.read_state()
    out = {"driver_pid": pid if pid and pid > 0 else None, "driver_alive": pid is not None}
    if recorded in ("running", "starting") and pid is None and store.exists():
        out["status"] = "stopped"
    if state and state.get("stopped"):
        out["stopped_reason"] = state["stopped"].get("reason")
    return out


def format_driver(status: dict) -> str:
    if status["driver_alive"]:
        who = f"pid {status['driver_pid']}" if status["driver_pid"] else "alive"
        return f"driver       {who}"
    if status["status"] == "finished":
        return "driver       none (finished)"
    reason = status.get("stopped_reason") or "killed or crashed (nothing recorded)"
    return f"driver       none: {reason}; `evofuse resume {status['run']}` goes on from the last checkpoint"


def cmd_export(args) -> int:
    from search.results.export import check_export_target, export_member, top_ids
    from search.run.session import check_run
    from search.run.store import RunStore

    run, out = Path(args.run_dir), Path(args.out)
    store = RunStore(run)
    check_run(store, weights=False)  # a corrupt config, checkpoint or journal: one line (weights: when read)
    if args.id:
        check_export_target(run, out, None, args.force)
        paths = [export_member(run, args.id, out, args.dtype, replace=args.force)]
    else:
        if args.pareto:
            from search.results.report import pareto_ids

            ids = pareto_ids(store)
        else:
            ids = top_ids(run, args.top)
        check_export_target(run, out, ids, args.force)  # every target, before any is written
        paths = [export_member(run, i, out / i, args.dtype, replace=args.force) for i in ids]
    for path in paths:
        print(path)
    return 0


def cmd_report(args) -> int:
    from search.results.report import write_report
    from search.run.session import check_run
    from search.run.store import RunStore

    check_run(RunStore(args.run_dir), weights=False)
    print(write_report(Path(args.run_dir)))
    return 0


def cmd_eval(args) -> int:
    import torch

    from search.fitness import TaskError, build_task, parse_task_arg
    from search.models.sources import load_model

    options = {k: v for k, v in (("context_length", args.context_length), ("batch_size", args.batch_size)) if v is not None}
    specs = [replace(parse_task_arg(t), options=options) for t in args.task]
    kl_specs = [spec for spec in specs if spec.kind == "kl"]
    if kl_specs and not args.reference:
        raise TaskError(f"--task {kl_specs[0].label}: a kl task measures how far the model's next-token distributions "
                        "moved from another model's: give it with --reference MODEL (e.g. the model it was compressed from)")
    if args.reference and not kl_specs:
        raise TaskError("--reference: only kl tasks compare with a reference model (--task kl:DATA)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    progress = not args.quiet and not args.json

    def load(source: str):
        return load_model(source, dtype=dtype, device=device, allow_pickle=args.allow_pickle,
                          trust_remote_code=args.trust_remote_code)

    references = {}
    if kl_specs:  # the reference's distributions first, so only one of the two models is ever resident
        reference_model, reference_tokenizer = load(args.reference)
        for spec in kl_specs:
            references[spec.label] = build_task(spec, reference_tokenizer).reference(reference_model, progress=progress)
        del reference_model
    model, tokenizer = load(args.source)
    results = {}
    for spec in specs:
        task = build_task(spec, tokenizer)
        subsample = int(args.subsample) if args.subsample and args.subsample >= 1 else args.subsample
        against = {"reference": references[spec.label]} if spec.label in references else {}
        results[spec.label] = task.evaluate(model, subsample=subsample, progress=progress, **against)
    if args.json:
        print(json.dumps(results))
    else:
        for label, metrics in results.items():
            print(label)
            for key, value in metrics.items():
                print(f"  {key:>18}  {value:.6g}" if isinstance(value, float) else f"  {key:>18}  {value}")
    return 0


def cmd_compress(args) -> int:
    from search.models.datasets import calibration_windows
    from compression.plan import apply_plan, check_plan, load_plan_file

    from search.models.sources import load_model

    out = Path(args.out)
    _check_out_dir(out, args.force)
    if args.search:  # evolve the plan first (compression/structure_search.py); its state resumes
        from compression.structure_search import StructureSearch

        settings = StructureSearch.load(args.search)
    else:
        plan = load_plan_file(args.plan)
    model, tokenizer = load_model(args.source, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    calibration = calibration_windows(tokenizer, args.calibration, args.seq_len, args.num_sequences)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr))
    from compression.loader import atomic_write_text

    if args.search:
        plan_text = _structure_search(model, calibration, settings, out, log)
        plan = load_plan_file(out / "evofuse_plan.yaml")
    else:
        plan_text = Path(args.plan).read_text()
    check_plan(plan, model.config)

    from search.models.progress import SetupStep
    from search.results.export import save_model

    # one step at a time, so even --quiet says how far the calibration statistics and
    # reconstructions have come (apply_plan applies its steps in order, each to the last's output)
    with SetupStep(f"compress {args.source}: {len(plan)} plan steps", total=len(plan), quiet=args.quiet) as progress:
        for i, step in enumerate(plan):
            if log:
                log(f"plan[{i}]: {step.model_dump(mode='json')}")
            model = apply_plan(model, [step], calibration)
            progress.update()
    save_model(model, tokenizer, out)
    atomic_write_text(out / "evofuse_plan.yaml", plan_text)
    print(out)
    return 0


def _structure_search(model, calibration, settings, out: Path, log) -> str:
    """Run (or resume, from OUT/structure_search_state.json) the structure search; write the
    evolved plan (OUT/evofuse_plan.yaml) and its record (OUT/structure_search.json)."""
    import yaml

    from compression.loader import atomic_write_text
    from compression.structure_search import run_structure_search

    out.mkdir(parents=True, exist_ok=True)
    result = run_structure_search(model, calibration, settings, state_path=out / "structure_search_state.json", log=log)
    text = "# evolved by `evofuse compress --search` (replay with --plan)\n" + yaml.safe_dump({"plan": result.plan}, sort_keys=False)
    atomic_write_text(out / "evofuse_plan.yaml", text)
    atomic_write_text(out / "structure_search.json", json.dumps({"settings": settings.model_dump(mode="json"), **result.to_data()}, indent=1))
    return text


def _check_out_dir(out: Path, force: bool) -> None:
    """An output directory for `compress`: not a file; empty or new unless --force."""
    from search.errors import EvofuseError

    if out.exists() and not out.is_dir():
        raise EvofuseError(f"--out {out}: is a file, not a directory")
    if not force and out.is_dir() and any(out.iterdir()):
        raise EvofuseError(f"--out {out}: not empty (choose an empty or new directory, or --force to write into it)")


def cmd_merge(args) -> int:
    from evolve import prefetch

    # a TIES merge's thresholds need no torch: a worker process finds them while this one imports it
    prefetch.start(args.config)
    try:
        from search.merge import run_merge

        run_merge(args.config, args.out, allow_pickle=args.allow_pickle, quiet=args.quiet)
    finally:
        prefetch.stop()
    return 0


def cmd_demo(args) -> int:
    from search.demo import run_demo

    return run_demo(run_dir=args.run_dir, address=args.address, quiet=args.quiet, fresh=args.fresh)


# ---- parser -------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with bad arguments reported as every other bad input: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def count(smallest: int):
    """An argparse type: an integer >= smallest, named in the one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < smallest:
            raise argparse.ArgumentTypeError(f"must be at least {smallest}, got {value}")
        return value

    return parse


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from search.tuning.space import CalibrationConfig

    parser = Parser(prog="evofuse", description="Evolve, merge and compress language models.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("search", help="launch a population search")
    p.add_argument("config")
    p.add_argument("--run-dir")
    p.add_argument("--address", help="join an existing Ray cluster (default: a local Ray)")
    p.add_argument("--workers", type=count(1), help="number of evaluator actors (overrides workers.count)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="set one config field for this run, e.g. --set evolver.generations=3 (a dotted path, "
                        "list items by number; the value is read as YAML); repeatable; the run's config.yaml "
                        "records the result")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint and journal")
    p.add_argument("run_dir")
    p.add_argument("--config", help="refuse to resume if this config differs from the run's")
    p.add_argument("--address")
    p.add_argument("--workers", type=count(1), help="number of evaluator actors from now on (overrides workers.count)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="as search's --set, for what changes no result: workers.count, workers.address, "
                        "workers.recipe_stats_gib; the run's config.yaml records it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="where a run stands")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write candidates as Hugging Face model directories")
    p.add_argument("run_dir")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--top", type=count(1))
    which.add_argument("--pareto", action="store_true")
    which.add_argument("--id")
    p.add_argument("--out", required=True, help="--id: the model directory; --top/--pareto: one subdirectory per candidate")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--force", action="store_true", help="replace earlier evofuse exports at the targets (nothing else)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write plots and report.md into RUN_DIR/report")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="score a model on fitness tasks")
    p.add_argument("source", help="Hugging Face directory or built-in name (smollm2-135m)")
    p.add_argument("--task", action="append", required=True, metavar="KIND:DATA")
    p.add_argument("--context-length", type=count(1), help="tokens per window / sequence (default: the model's maximum)")
    p.add_argument("--batch-size", type=count(1))
    p.add_argument("--subsample", type=positive_number, help="score N items (or a fraction) drawn with seed 0")
    p.add_argument("--reference", metavar="MODEL", help="kl tasks: the model whose next-token distributions SOURCE's are "
                   "compared with (e.g. the one it was compressed from; Hugging Face directory or built-in name)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help="let a model directory's own Python code (auto_map) run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="apply a compression plan to a model, or search one (--search)")
    p.add_argument("source")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--plan", help="the plan YAML to apply")
    how.add_argument("--search", metavar="SETTINGS", help="structure-search YAML: evolve which blocks stay and how wide each "
                     "layer is, then apply the evolved plan (resumes from --out's state with --force)")
    p.add_argument("--out", required=True)
    calibration = CalibrationConfig()  # the same defaults as a search's plans
    p.add_argument("--calibration", default=calibration.data, help=f"calibration data (default {calibration.data})")
    p.add_argument("--seq-len", type=count(2), default=calibration.seq_len)
    p.add_argument("--num-sequences", type=count(1), default=calibration.num_sequences)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help="let a model directory's own Python code (auto_map) run")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("merge", help="one-shot merge from a mergekit-style YAML")
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="the demo search on SmolLM2-135M (configs/demo.yaml; configs/demo-float32.yaml "
                                    "where the CPU emulates bfloat16)")
    p.add_argument("--run-dir")
    p.add_argument("--address")
    p.add_argument("--fresh", action="store_true", help="start over even if the demo run exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _print_summary(root: Path, quiet: bool) -> None:
    from search.results.report import results_table

    print(results_table(root))


def quiet_transformers(quiet: bool) -> None:
    """Transformers' loading bars off (our own bars say what is happening), and with --quiet
    its warnings too. Through the environment while transformers is not imported yet: it reads
    these settings on import, so a command that never loads a model (`merge`) never pays the
    second it takes to import it."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if quiet:
            hf_logging.set_verbosity_error()
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if quiet:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    quiet_transformers(getattr(args, "quiet", False) or getattr(args, "json", False))
    from search.run.lock import RunLock

    try:
        return args.func(args)
    except BAD_INPUT as exc:
        print(f"evofuse {args.verb}: {one_line(exc)}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"evofuse {args.verb}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evofuse {args.verb}: interrupted (a run resumes with `evofuse resume`)", file=sys.stderr)
        return 130
    finally:
        RunLock.release_all()


# Verbs that leave nothing for the interpreter's teardown once they return: no Ray runtime, no
# child process, every file written, fsynced and closed. After them the `evofuse` executable
# exits at once: unloading torch and the modules took 0.5 s of a 3.5 s `evofuse merge` here.
FAST_EXIT_VERBS = frozenset({"merge"})


def console() -> None:
    """The `evofuse` executable (pyproject's console script): `main` with the process's arguments."""
    code = main()
    verb = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if verb in FAST_EXIT_VERBS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
