"""Reading a run back: status, the parents-vs-best table, plots and report.md."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from search.config import ConfigError, load_config
from evolve.population import WORST, member_from_json, member_score, pareto_front_of

from search.results.staging import format_staged, full_dev_rows, last_stage, staged_summary
from search.run.store import RunStore

# The metric a person reads for each kind (the search itself aggregates each task's "score").
DISPLAY_METRIC = {"perplexity": "token_perplexity", "multiple_choice": "acc_norm", "generate": "exact_match", "lm_eval": "score"}


def display_metric(task) -> str:
    return task.options.get("metric") or DISPLAY_METRIC[task.kind]


def _load(run_dir: Path):
    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return store, load_config(store.config_path), store.read_state()


def run_status(run_dir: Path) -> dict:
    store, config, state = _load(run_dir)
    journal = store.read_journal()
    logbook = store.read_logbook()
    dev = full_dev_rows(journal, last_stage(config))  # a staged run's partial stages and stops are not results
    best_per_task = {}
    for task in config.tasks:
        scored = [e for e in dev if e.get("status") == "ok" and task.name in e["metrics"]]
        if scored:
            top = max(scored, key=lambda e: e["metrics"][task.name]["score"])
            metric = display_metric(task)
            best_per_task[task.name] = {"id": top["id"], metric: top["metrics"][task.name].get(metric), "score": top["metrics"][task.name]["score"]}
    generations = config.evolver.generations
    done = state["generation"] if state else 0
    per_generation = [r["wall_s"] for r in logbook]
    eta = None
    if state and state["status"] != "finished" and per_generation:
        eta = round(sum(per_generation) / len(per_generation) * (generations - done))
    best = max(state["population"], key=lambda m: m["score"]) if state else None
    return {
        "run": str(run_dir),
        "status": state["status"] if state else "starting",
        "generation": done,
        "generations": generations,
        "evaluations": len({e["id"] for e in journal if e["split"] == "dev"}),
        "failed": sum(1 for e in dev if e.get("status") != "ok"),
        "best": {"id": best["id"], "score": best["score"]} if best else None,
        "front": front_of(state) if state and config.sized else None,
        "best_per_task": best_per_task,
        "eta_s": eta,
        "staged": staged_summary(journal, last_stage(config), merge=config.mode == "merge",
                                 task_weights={t.name: t.weight for t in config.tasks}, confidence=config.fitness.confidence),
        "recipe_study": _recipe_study(run_dir) if config.mode == "recipe" else None,
        "actor_memory": actor_memory(journal),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(store.journal_path.stat().st_mtime)) if store.journal_path.exists() else None,
    }


def front_of(state: dict) -> list[dict]:
    """A compress / joint run's Pareto front so far (its hall of fame), smallest first."""
    members = [{"id": m["id"], "params": m.get("params"), "score": m["score"]} for m in state["hall_of_fame"]]
    return sorted(members, key=lambda m: (m["params"] is None, m["params"] or 0))


def format_front(front: list[dict]) -> str:
    shown = ", ".join(f"{m['id']} {m['params'] / 1e6:.1f}M {m['score']:.4f}" if m["params"] else f"{m['id']} {m['score']:.4f}"
                      for m in front)
    return f"front        {len(front)} members, smallest first: {shown}"


def actor_memory(journal: list[dict]) -> dict | None:
    """The actors' largest resident set and the job that set it. Each row's `memory` is its
    actor's GiB after the job (resident, private heap) and the most that actor has ever held
    (`peak_gib`, VmHWM: it only grows, and counts the object-store pages the actor has mapped),
    so the first row in the journal at the highest peak is the job that raised it.
    `private_gib`: the most private heap any actor held after its last job."""
    rows = [r for r in journal if r.get("memory", {}).get("peak_gib") is not None]
    if not rows:
        return None
    top = max(rows, key=lambda r: r["memory"]["peak_gib"])  # the first of equal maxima
    last = {r.get("worker"): r["memory"] for r in rows}  # each actor's last row wins
    job = {"id": top["id"], "split": top["split"], "stage": top.get("stage"), "autocast": top.get("autocast")}
    return {"peak_gib": top["memory"]["peak_gib"], "set_by": job, "actors": len(last),
            "private_gib": max(m["private_gib"] for m in last.values())}


def format_actor_memory(memory: dict) -> str:
    job = memory["set_by"]
    how = ", ".join(str(v) for v in (job["split"], job["stage"] is not None and f"stage {job['stage']}", job["autocast"]) if v)
    return (f"actors       peak {memory['peak_gib']:.2f} GiB resident (object-store pages included), set by "
            f"{job['id']} ({how}); {memory['private_gib']:.2f} GiB private after the last job "
            f"({memory['actors']} actor processes)")


def _recipe_study(run_dir: Path) -> dict | None:
    from search.run.recipe_mode import study_summary

    return study_summary(run_dir)


def format_status(status: dict) -> str:
    lines = [
        f"run          {status['run']} ({status['status']})",
        f"generation   {status['generation']}/{status['generations']}",
        f"evaluations  {status['evaluations']} ({status['failed']} failed)",
    ]
    if status["best"]:
        lines.append(f"best         {status['best']['id']}  dev score {status['best']['score']:.6g}")
    if status.get("front"):
        lines.append(format_front(status["front"]))
    if status["best_per_task"]:  # not the best's own: each task's leader, often a parent
        lines.append("per task     the leader on each task's dev split, any candidate scored in full")
    for task, best in status["best_per_task"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k != "id" and isinstance(v, float))
        lines.append(f"  {task:<10} {best['id']}: {shown}")
    if status.get("staged"):
        lines += format_staged(status["staged"])
    if status.get("recipe_study"):
        from search.run.recipe_mode import format_study

        lines += format_study(status["recipe_study"])
    if status.get("actor_memory"):
        lines.append(format_actor_memory(status["actor_memory"]))
    if status["eta_s"] is not None:
        lines.append(f"eta          {status['eta_s'] // 60} min {status['eta_s'] % 60} s")
    return "\n".join(lines)


def _metric(journal: dict, member_id: str, split: str, task) -> float | None:
    entry = journal.get((member_id, split))
    if not entry or entry.get("status") != "ok":
        return None
    return entry["metrics"].get(task.name, {}).get(_table_key(task))


def _table_key(task) -> str:
    """The metrics key of a task's display metric: an lm_eval task reports `{leaf}/{metric}`
    per leaf task, and its `score` is that metric's mean over them."""
    return "score" if task.kind == "lm_eval" else display_metric(task)


def _finite(value) -> bool:
    """A number that means something: not missing, not NaN / inf, not the WORST sentinel."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > WORST


def shown_score(entry: dict | None) -> str:
    """A dev score as a person reads it: the number, or why there is none (failed, non-finite,
    stopped) — never the WORST sentinel a failed candidate is ranked with."""
    if entry is None:
        return "-"
    if entry.get("status") != "ok":
        return {"nonfinite": "non-finite"}.get(entry.get("status"), entry.get("status") or "failed")
    return f"{entry['score']:.4f}" if _finite(entry.get("score")) else "non-finite"


def shown_value(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "non-finite"


def results_table(run_dir: Path) -> str:
    """Markdown: every parent and the best merged candidate on each task's dev and test split
    (and, in compress / joint runs, whose candidates are smaller, each one's parameters), then
    what the run found, said plainly (see `verdict`)."""
    store, config, state = _load(run_dir)
    if state is None:
        return f"{run_dir}: no results yet"
    rows = store.read_journal()
    journal = {(e["id"], e["split"]): e for e in rows}
    parents = [p.name for p in config.parents.all()]
    full = {e["id"]: e for e in full_dev_rows(rows, last_stage(config)) if e["status"] == "ok" and _finite(e.get("score"))}
    merged = {cid: e for cid, e in full.items() if cid not in parents}
    best = max(merged.values(), key=lambda e: e["score"], default=None)
    table = [(p.name, "base" if p is config.parents.base else "expert") for p in config.parents.all()]
    if best is not None:
        table.append((best["id"], "best merged candidate"))
    header = ["model", "role", "dev score"] + (["params"] if config.sized else []) + [
        f"{t.name} {split} ({display_metric(t)})" for t in config.tasks for split in ("dev", "test")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for member_id, role in table:
        cells = [member_id, role, shown_score(journal.get((member_id, "dev")))]
        if config.sized:  # candidates differ in size: shown beside the score
            cells.append(shown_params(journal.get((member_id, "dev"))))
        for task in config.tasks:
            cells += [shown_value(_metric(journal, member_id, split, task)) for split in ("dev", "test")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + verdict(config, journal, full, merged, best))


def verdict(config, journal: dict, full: dict, merged: dict, best: dict | None) -> list[str]:
    """Whether any merged candidate beat the best parent (dev aggregate), by how much, and the
    same per task (each task's best parent against its best merged candidate)."""
    lines = []
    broken = [f"{p.name} ({shown_score(journal.get((p.name, 'dev')))})" for p in config.parents.all() if p.name not in full]
    if broken:
        lines.append(f"Left out of every comparison below (no finite dev score): {', '.join(broken)}.")
    parents = {p.name: full[p.name] for p in config.parents.all() if p.name in full}
    if not parents or best is None:
        return lines + ["No merged candidate has a full dev score yet." if parents else "No parent has a finite dev score."]
    top = max(parents.values(), key=lambda e: e["score"])
    gap = best["score"] - top["score"]
    experts = [full[e.name]["score"] for e in config.parents.experts if e.name in full]
    average = f"; the experts' average is {sum(experts) / len(experts):.4f}" if experts else ""
    size = relative_size(best, top) if config.sized else ""
    if gap > 0:
        lines.append(f"The best merged candidate ({best['id']}, dev score {best['score']:.4f}{size}) beats the best parent "
                     f"({top['id']}, {top['score']:.4f}) by {gap:.4f}{average}.")
    else:
        lines.append(f"No merged candidate beat the best parent: {top['id']} (dev score {top['score']:.4f}) is ahead of "
                     f"the best merged candidate ({best['id']}, {best['score']:.4f}{size}) by {-gap:.4f}{average}.")
    lines.append("Per task (dev; each task's best parent against its best merged candidate):")
    for task in config.tasks:
        lines.append(f"- {_task_verdict(task, parents, merged)}")
    return lines


def shown_params(entry: dict | None) -> str:
    return f"{entry['num_params']:,}" if entry and entry.get("num_params") else "-"


def relative_size(candidate: dict, parent: dict) -> str:
    """', N parameters, P% of PARENT's' for a run whose candidates are smaller than the parents
    (empty where either count is missing)."""
    if not candidate.get("num_params") or not parent.get("num_params"):
        return ""
    share = 100 * candidate["num_params"] / parent["num_params"]
    return f", {candidate['num_params']:,} parameters, {share:.1f}% of {parent['id']}'s"


def _task_verdict(task, parents: dict, merged: dict) -> str:
    metric, key = display_metric(task), _table_key(task)

    def best_on(entries: dict):
        scored = [e for e in entries.values() if _finite(e["metrics"].get(task.name, {}).get("score"))]
        return max(scored, key=lambda e: e["metrics"][task.name]["score"], default=None)

    parent, candidate = best_on(parents), best_on(merged)
    if parent is None or candidate is None:
        return f"{task.name}: {'no parent' if parent is None else 'no merged candidate'} has a finite score"
    p, c = parent["metrics"][task.name], candidate["metrics"][task.name]
    shown = f"{candidate['id']} {metric} {shown_value(c.get(key))} against {parent['id']} {shown_value(p.get(key))}"
    difference = ""
    if _finite(c.get(key)) and _finite(p.get(key)):
        difference = f" (difference {c[key] - p[key]:+.4f})"
    if c["score"] > p["score"]:
        return f"{task.name}: a merged candidate beats the best parent: {shown}{difference}"
    return f"{task.name}: no merged candidate beats the best parent: {shown}{difference}"


def pareto_section(store: RunStore, state: dict, out: Path, last: int | None) -> list[str]:
    """pareto_front.png (every candidate scored in full, the front, the parents and any
    baselines) and the table of the front's plans. A staged run's earlier stages are not dev
    scores (a KL proxy, or a subset), so only full rows count (`full_dev_rows`, `last`: the last
    stage). Baselines come from report/baselines.json when a benchmark wrote one:
    [{"label", "params", "score"}]."""
    import matplotlib.pyplot as plt

    dev = [e for e in full_dev_rows(store.read_journal(), last) if e.get("status") == "ok" and "num_params" in e]
    front_ids = set(pareto_ids(store))
    front = sorted((e for e in dev if e["id"] in front_ids), key=lambda e: e["num_params"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([e["num_params"] / 1e6 for e in dev], [e["score"] for e in dev], s=12, alpha=0.4, label="candidates")
    ax.plot([e["num_params"] / 1e6 for e in front], [e["score"] for e in front], "o-", color="C3", label="Pareto front")
    for name, parent in state["parents"].items():
        if parent.get("num_params"):
            ax.scatter([parent["num_params"] / 1e6], [parent["score"]], marker="s", color="k")
            ax.annotate(name, (parent["num_params"] / 1e6, parent["score"]), fontsize=7)
    baselines_path = out / "baselines.json"
    if baselines_path.is_file():
        for b in json.loads(baselines_path.read_text()):
            ax.scatter([b["params"] / 1e6], [b["score"]], marker="x", color="C2")
            ax.annotate(b["label"], (b["params"] / 1e6, b["score"]), fontsize=7)
    save_score_plot(fig, ax, "parameters (M)", out / "pareto_front.png")
    timed = all(e.get("latency_ms") is not None for e in front) and bool(front)
    if timed:
        latency_plot(dev, front, state, out)
    columns = ["id", "params", "latency ms", "dev score", "plan"] if timed else ["id", "params", "dev score", "plan"]
    rows = ["## Pareto front (dev)", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for e in front:
        plan = plan_summary(e.get("plan") or [])
        latency = f" {e['latency_ms']:.1f} |" if timed else ""
        rows.append(f"| {e['id']} | {e['num_params']:,} |{latency} {e['score']:.4f} | {plan} |")
    rows += ["", "![Pareto front](pareto_front.png)", ""]
    return rows + (["![dev score against latency](pareto_latency.png)", ""] if timed else [])


def plan_summary(plan: list[dict]) -> str:
    """A plan as one table cell: each step's structure (which blocks go, how much of each layer's
    width, in layer order) before its method's settings; "(dense)" for no plan."""
    return "; ".join(step_summary(step) for step in plan) or "(dense)"


def step_summary(step: dict) -> str:
    op, settings = step.get("op", "?"), {k: v for k, v in step.items() if k != "op"}
    if op == "prune_width":
        method_keys = ("target", "criterion", "reconstruct", "ridge")  # named first, the rest after
        shown = [f"{k} {settings[k]}" for k in method_keys if k in settings] + [
            f"{k} {v}" for k, v in settings.items() if k not in (*method_keys, "ratio", "layers")]
        described = f" ({', '.join(shown)})" if shown else ""
        return f"prune_width{described}: {width_cuts(settings.get('ratio'), settings.get('layers'))}"
    if op in ("remove_blocks", "fuse_blocks") and settings.get("blocks") is not None:
        blocks = ", ".join(str(b) for b in sorted(settings.pop("blocks")))
        rest = ", ".join(f"{k} {v}" for k, v in settings.items())
        return f"{op} {blocks}" + (f" ({rest})" if rest else "")
    return op + "".join(f", {k}={v}" for k, v in settings.items())


def width_cuts(ratio, layers: list[int] | None = None) -> str:
    """The share of each layer's targeted parameters a width step removes, in percent: one
    number for a uniform ratio (of every layer, or of `layers`), else the layers in order (a
    journalled plan's keys are strings, which sort 0, 1, 10, 11, ...)."""
    if not isinstance(ratio, dict):
        where = "every layer" if layers is None else "layers " + ", ".join(str(i) for i in sorted(layers))
        return f"cut {100 * float(ratio):.0f}% of {where}"
    cuts = sorted((int(layer), 100 * float(r)) for layer, r in ratio.items())
    mean = sum(r for _, r in cuts) / len(cuts)
    if [layer for layer, _ in cuts] == list(range(len(cuts))):  # every layer from 0: the list says which
        shown = " ".join(f"{r:.0f}" for _, r in cuts)
        return f"cut % of layers 0-{len(cuts) - 1}: {shown} (mean {mean:.1f})"
    shown = " ".join(f"{layer}:{r:.0f}" for layer, r in cuts)
    return f"cut % by layer: {shown} (mean {mean:.1f} over these)"


def latency_plot(dev: list[dict], front: list[dict], state: dict, out: Path) -> None:
    """pareto_latency.png: dev score against measured latency; the front's members in red."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    timed = [e for e in dev if e.get("latency_ms") is not None]
    ax.scatter([e["latency_ms"] for e in timed], [e["score"] for e in timed], s=12, alpha=0.4, label="candidates")
    ax.scatter([e["latency_ms"] for e in front], [e["score"] for e in front], color="C3", label="Pareto front")
    for name, parent in state["parents"].items():
        if parent.get("latency_ms") is not None:
            ax.scatter([parent["latency_ms"]], [parent["score"]], marker="s", color="k")
            ax.annotate(name, (parent["latency_ms"], parent["score"]), fontsize=7)
    save_score_plot(fig, ax, "forward latency (ms, median)", out / "pareto_latency.png")


def save_score_plot(fig, ax, xlabel: str, path: Path) -> None:
    """Label a dev-score scatter (y) against `xlabel`, write it as a PNG, free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev aggregate score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_ids(store: RunStore) -> list[str]:
    """The run's Pareto front (evolve.population.pareto_front_of over members and hall of fame),
    best dev score first; a merge run's front is its best member."""
    state = store.read_state()
    if state is None:
        raise ConfigError(f"{store.root}: no state.json")
    members = {m["id"]: m for m in state["hall_of_fame"] + state["population"]}.values()
    front = pareto_front_of(member_from_json(m) for m in members)
    return [m["id"] for m in sorted(front, key=member_score, reverse=True)]


def write_report(run_dir: Path) -> Path:
    """report/score_per_generation.png and report/report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    store, config, state = _load(run_dir)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    logbook = store.read_logbook()
    fig, ax = plt.subplots(figsize=(6, 4))
    if logbook:
        gens = [r["gen"] + 1 for r in logbook]
        ax.plot(gens, [r["best"] for r in logbook], marker="o", label="best")
        ax.plot(gens, [r["mean"] for r in logbook], marker=".", label="mean")
    if state:
        for k, (name, parent) in enumerate(state["parents"].items()):
            ax.axhline(parent["score"], linestyle=":", linewidth=1, color="0.45", label="parents" if k == 0 else None)
            # named at the left edge, whatever the generations span
            ax.annotate(name, (0.01, parent["score"]), xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color="0.3")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations are whole numbers
    ax.set_xlabel("generation")
    ax.set_ylabel("dev aggregate score")
    ax.set_title(f"{config.name}: score per generation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_per_generation.png", dpi=120)
    plt.close(fig)
    text = [f"# Report: {config.name}", "", results_table(run_dir), ""]
    if config.sized:
        text += pareto_section(store, state, out, last_stage(config))
    status = run_status(run_dir)
    if status["staged"]:
        text += ["## Staged fitness", "", "```", *format_staged(status["staged"]), "```", ""]
    text += ["## Logbook", ""]
    text += ["| gen | evals | best | mean | replaced | wall s |", "|---|---|---|---|---|---|"]
    text += [f"| {r['gen'] + 1} | {r['evals']} | {r['best']:.4f} | {r['mean']:.4f} | {r['replaced']} | {r['wall_s']:.1f} |" for r in logbook]
    text += ["", "![score per generation](score_per_generation.png)", ""]
    (out / "report.md").write_text("\n".join(text))
    (out / "status.json").write_text(json.dumps(status, indent=1))
    return out / "report.md"
