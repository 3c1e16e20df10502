"""The `lm_eval` fitness kind: lm-evaluation-harness tasks run on the in-memory candidate model.

DATA is a comma-separated list of lm-eval task names (`hellaswag,arc_easy`) and/or task YAML
files (`tasks/my_mc.yaml`, whose directory is added to lm-eval's include path, so YAMLs that
point `dataset_path: json` at local files work offline; relative `data_files` are read from
the current directory, as lm-eval reads them). Option `include_path` adds further directories
of task YAMLs. The model is wrapped in lm-eval's `HFLM(pretrained=model)` for each evaluation:
nothing is written to disk. Groups are expanded to their leaf tasks once at build time, and
the task objects (their data) are reused for every candidate.

Splits. lm-eval scores a task's `test_split` (its `validation_split` when there is none). A
search must select on other documents than it reports, so each item may name its split:
`my_mc.yaml:validation` (or `:dev`), `:test`, `:train` score the YAML's `validation_split`,
`test_split`, `training_split`. A run config's lm_eval task names them on both sides
(`dev: my_mc.yaml:validation`, `test: my_mc.yaml:test`); `search.preflight` refuses a config
whose dev and test come to the same documents. A task whose validation_split and test_split
are the same split is refused when either is asked for by name.

Metrics come back as `"{task}/{metric}"` (lm-eval's filter suffix `,none` dropped). `score` is the
mean over leaf tasks of one metric (option `metric`; by default the first of acc_norm, acc,
exact_match, word_perplexity, ... that the task reports), turned "higher is better": a
perplexity p counts as -log p, any other lower-is-better metric as its negative.

HFLM's `logits_cache` (reuse of one forward pass across one-token continuations) is turned off
when any task scores rolling perplexity: in lm-eval 0.4.13 it returned a wrong log-likelihood when
rolling windows of several documents shared a batch (SmolLM2-135M, pydoc:dev doc 0, max_length
256, batch 8: -2142.29 where batch 1, logits_cache=False and a by-hand sum all give -1249.54).
Option `logits_cache: true|false` overrides.

Subsampling draws `subsample` documents of each task with `random.Random(seed)` and passes them
as lm-eval's `samples`; option `limit` is lm-eval's own (the first N documents).

Per-example scores and explicit `indices` are not available for this kind: lm-eval scores its
own documents of several leaf tasks, and `score` is a mean over tasks, not a ratio over items.
`evaluate(..., per_example=True)` or `indices=[...]` raises one TaskError line; staged
evaluation (search/fitness/staged.py) must score lm_eval tasks whole, or with `subsample`.

lm-eval is an optional dependency (tested with lm-eval==0.4.13); without it building an
`lm_eval` task raises one TaskError line saying how to install it.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path

from search.fitness.base import FitnessTask
from search.fitness.kernels import subsample_indices
from search.fitness.spec import TaskError, TaskSpec, register_task_kind

LM_EVAL_PIN = "lm-eval==0.4.13"
OPTIONS = {
    "batch_size", "context_length", "num_fewshot", "limit", "metric", "include_path", "subsample", "logits_cache",
}
DEFAULT_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity")


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError(
            f"task kind lm_eval needs lm-evaluation-harness, which is not installed: pip install '{LM_EVAL_PIN}'"
        ) from None


def _yaml_task_name(path: Path) -> str:
    """The `task:` name in an lm-eval task YAML (its `!function` tags are skipped, not run)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise TaskError(f"{path}: an lm-eval task YAML needs a string `task:` name")
    return name


# `ITEM:SPLIT` names one of the task's own splits by the YAML key that holds its name
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "dev": "validation_split", "test": "test_split"}


def split_item(item: str) -> tuple[str, str | None]:
    """`name_or_yaml[:split]` -> (name or YAML path, split word or None)."""
    head, sep, tail = item.strip().rpartition(":")
    if sep and head and tail in SPLIT_KEYS:
        return head, tail
    return item.strip(), None


def is_yaml(item: str) -> bool:
    return item.endswith((".yaml", ".yml"))


def parse_lm_eval_items(data: str, include_path=None) -> tuple[list[tuple[str, str | None]], list[str]]:
    """([(task name, split word or None), ...], include directories) from
    `name[:split],file.yaml[:split]` plus the include_path option."""
    items, include = [], []
    for extra in [include_path] if isinstance(include_path, str) else list(include_path or []):
        if not Path(extra).is_dir():
            raise TaskError(f"lm_eval option include_path: {extra}: no such directory")
        include.append(str(Path(extra).resolve()))
    for part in data.split(","):
        item, split = split_item(part)
        if not item:
            continue
        if is_yaml(item):
            path = Path(item)
            if not path.is_file():
                raise TaskError(f"{item}: no such lm-eval task YAML")
            items.append((_yaml_task_name(path), split))
            include.append(str(path.parent.resolve()))
        else:
            items.append((item, split))
    if not items:
        raise TaskError(f"lm_eval:{data}: no task names")
    return items, sorted(set(include))


def parse_lm_eval_data(data: str, include_path=None) -> tuple[list[str], list[str]]:
    """(task names, include directories) from `name,name,file.yaml` plus the include_path option
    (split suffixes are accepted and left out; `parse_lm_eval_items` keeps them)."""
    items, include = parse_lm_eval_items(data, include_path)
    return [name for name, _ in items], include


def choose_split(task, split: str | None, label: str) -> None:
    """Point an lm-eval task at the split asked for: lm-eval scores `eval_docs`, which is its
    `test_split` (else `validation_split`), so the asked-for split becomes the test_split."""
    if split is None:
        return
    config = task.config
    key = SPLIT_KEYS[split]
    name = getattr(config, key, None)
    if not name:
        raise TaskError(f"{label}: lm-eval task {config.task!r} has no {key} (asked for :{split})")
    if split != "train" and config.validation_split and config.validation_split == config.test_split:
        raise TaskError(
            f"{label}: lm-eval task {config.task!r} has validation_split == test_split == {name!r}: "
            "its dev and test documents cannot be told apart"
        )
    dataset = getattr(task, "dataset", None)
    if dataset is not None and hasattr(dataset, "keys") and name not in dataset.keys():
        raise TaskError(f"{label}: lm-eval task {config.task!r} has no split {name!r} (has: {', '.join(dataset.keys())})")
    config.test_split = name


def _leaf_tasks(task_dict) -> list:
    """Task objects of a (possibly nested, group-keyed) lm-eval task dict."""
    leaves = []
    for value in task_dict.values():
        leaves.extend(_leaf_tasks(value) if isinstance(value, dict) else [value])
    return leaves


@register_task_kind("lm_eval", OPTIONS)
class LmEvalTask(FitnessTask):
    """lm-eval's own tasks, run through `simple_evaluate` on an `HFLM` around the model."""

    def __init__(self, spec: TaskSpec, tokenizer):
        require_lm_eval()
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach a hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        super().__init__(spec, copy.deepcopy(tokenizer))  # HFLM may set a pad token on it
        from lm_eval.tasks import TaskManager, get_task_dict

        items, include = parse_lm_eval_items(spec.data, self.option("include_path"))
        self.names = [name for name, _ in items]
        only_files = all(is_yaml(split_item(part)[0]) for part in spec.data.split(",") if part.strip())
        only_files = only_files and not self.option("include_path")
        self.manager = manager = TaskManager(include_path=include or None, include_defaults=not only_files)
        for name in self.names:
            if name not in manager.all_tasks:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise TaskError(f"lm_eval: unknown lm-eval task {name!r}.{hint}")
        self.tasks = []
        for name, split in items:  # one item at a time: its split applies to its leaf tasks
            leaves = _leaf_tasks(get_task_dict([name], manager))
            for task in leaves:
                choose_split(task, split, self.label)
            self.tasks.extend(leaves)
        self.items = self.tasks  # len(task) = number of leaf tasks

    def evaluate(
        self, model, *, subsample=None, seed: int = 0, progress: bool = False, indices=None, per_example: bool = False
    ) -> dict[str, float]:
        if per_example or indices is not None:
            asked = "per-example scores" if per_example else "explicit indices"
            raise TaskError(f"{self.label}: {asked} are not available for lm_eval tasks (use subsample)")
        return self._run(model, subsample, seed)

    def _run(self, model, subsample, seed: int) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        model.eval()
        try:
            lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self._int_option("batch_size", 8),
                max_length=self._int_option("context_length", None),
                logits_cache=self.option("logits_cache", not self.has_rolling_tasks()),
            )
            subsample = subsample if subsample is not None else self.option("subsample")
            samples = None
            if subsample is not None:
                samples = {t.config.task: subsample_indices(len(t.eval_docs), subsample, seed) for t in self.tasks}
            out = simple_evaluate(
                model=lm, tasks=list(self.tasks), num_fewshot=self.option("num_fewshot"), limit=self.option("limit"),
                samples=samples, task_manager=self.manager, log_samples=False, bootstrap_iters=0, random_seed=seed, verbosity="ERROR",
            )
        finally:
            model.train(was_training)
        return self.summarise(out["results"])

    def has_rolling_tasks(self) -> bool:
        return any(getattr(t, "OUTPUT_TYPE", None) == "loglikelihood_rolling" for t in self.tasks)

    def summarise(self, results: dict) -> dict[str, float]:
        metrics: dict[str, float] = {}
        scores = []
        for task in self.tasks:
            name = task.config.task
            values = {
                key.split(",")[0]: float(value)
                for key, value in results.get(name, {}).items()
                if "," in key and "_stderr" not in key and isinstance(value, (int, float))
            }
            metrics.update({f"{name}/{key}": value for key, value in values.items()})
            scores.append(self.task_score(name, values, task.higher_is_better()))
        metrics["score"] = sum(scores) / len(scores)
        return metrics

    def task_score(self, name: str, values: dict[str, float], higher_is_better: dict) -> float:
        wanted = self.option("metric")
        metric = wanted if wanted else next((m for m in DEFAULT_METRICS if m in values), None)
        if metric not in values:
            raise TaskError(f"lm_eval: task {name!r} reports no metric {metric!r} (has: {', '.join(values) or 'none'})")
        value = values[metric]
        if higher_is_better.get(metric, True):
            return value
        return -math.log(value) if "perplexity" in metric else -value


__all__ = [
    "LmEvalTask", "LM_EVAL_PIN", "SPLIT_KEYS", "require_lm_eval", "parse_lm_eval_data", "parse_lm_eval_items", "split_item",
    "is_yaml", "choose_split",
]
