"""Checks a run config must pass before any work, for the mistakes that give a wrong answer
without a word rather than a crash. `search.config.load_config` calls `preflight` after
`check_data`; each problem is one `ConfigError` line naming the field (exit code 2).

1. Dev and test are different documents, for every task kind. Selection only ever sees dev and
   reports show test; a config whose two sides resolve to the same documents would select on
   the test set. Built-in splits compare by name (`pydoc:dev` vs `pydoc:test`); files by content
   (two files with the same bytes, or JSONL files with the same rows in any order, are the same
   documents; a partial overlap is logged as a warning); lm-eval items by what lm-eval would
   load: a task YAML's dataset (`dataset_path`, `dataset_name`, the content of its local
   `data_files`, `process_docs`) and the split scored — `x.yaml:validation` / `:test` / `:train`,
   or, without a suffix, lm-eval's own choice (`test_split`, else `validation_split`). A task
   from lm-eval's registry (a name, not a file) used on both sides must name two different
   splits (`hellaswag:validation`, `hellaswag:test`): its YAML is not read at config time.
   Relative lm-eval YAML paths are taken from the current directory, then from the config's.
2. The plan space fits the base model's architecture (compress / joint runs). Every op the
   space can choose is checked, as `compression.plan.check_plan` checks a plan, at the ends of
   its ranges and with each of its choices, against the base model's transformers config (read
   from its directory, not loaded): `compress.space.width: 'prune_width' cannot change this base
   model (op: prune_width supports llama, mistral, qwen2, not model_type 'gpt2')`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from search.errors import ConfigError
from search.schema import beside_config

if TYPE_CHECKING:
    from search.config import RunConfig

log = logging.getLogger(__name__)

# SmolLM2-135M-Instruct's config, for checking plans before the GGUF has been converted once
SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def preflight(config: RunConfig, base_dir: Path | None = None) -> None:
    """Every check of this module, in order; ConfigError on the first problem."""
    resolve_lm_eval_paths(config, base_dir)
    check_dev_test_distinct(config)
    check_space_architecture(config)


# --------------------------------------------------------------------------- dev vs test


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(path: Path) -> list[str] | None:
    """A JSONL file's rows as canonical JSON (key order and spacing do not count), or None."""
    if path.suffix != ".jsonl":
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # not text: compared by its bytes (check_tasks says what is wrong)
        return None
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False))
            except json.JSONDecodeError:
                return None
    return rows


def file_documents(spec: str) -> tuple[str, list[str] | None]:
    """(identity of a data spec's documents, its JSONL rows when it is JSONL)."""
    from search.models.datasets import builtin_name

    if spec.startswith("pydoc:") or builtin_name(spec) is not None:
        return f"built-in {spec}", None
    path = Path(spec)
    rows = _rows(path)
    if rows is not None:
        return f"rows {_sha256(json.dumps(sorted(rows)).encode())}", rows
    return f"file {_sha256(path.read_bytes())}", None


def check_dev_test_distinct(config: RunConfig) -> None:
    for i, task in enumerate(config.tasks):
        if task.kind == "lm_eval":
            _check_lm_eval_distinct(i, task)
            continue
        (dev, dev_rows), (test, test_rows) = file_documents(task.dev), file_documents(task.test)
        if dev == test:
            same = "the same split" if task.dev == task.test else "files with the same content"
            raise ConfigError(
                f"tasks[{i}].test: {task.test!r} holds the same documents as dev {task.dev!r} ({same}); "
                "selection would see the test set — give test held-out data"
            )
        if dev_rows and test_rows:
            shared = set(dev_rows) & set(test_rows)
            if shared:
                log.warning("tasks[%d] (%s): %d of %d distinct test rows are also dev rows (%s, %s)",
                            i, task.name, len(shared), len(set(test_rows)), task.dev, task.test)


def _check_lm_eval_distinct(i: int, task) -> None:
    dev = {key: item for item, key in _lm_eval_identities(task.dev, f"tasks[{i}].dev")}
    test = {key: item for item, key in _lm_eval_identities(task.test, f"tasks[{i}].test")}
    for d_key, d_item in dev.items():
        for t_key, t_item in test.items():
            # a registry task on both sides: two named, different splits, or refused
            if d_key[0] == t_key[0] == "registry" and d_key[1] == t_key[1] and (None in (d_key[2], t_key[2]) or d_key[2] == t_key[2]):
                raise ConfigError(
                    f"tasks[{i}]: dev {d_item!r} and test {t_item!r} do not name two different splits of lm-eval task "
                    f"{d_key[1]!r}; write e.g. dev: \"{d_key[1]}:validation\", test: \"{d_key[1]}:test\""
                )
    for key in dev.keys() & test.keys():
        if key[0] == "registry":
            continue  # told apart above
        raise ConfigError(
            f"tasks[{i}]: dev {dev[key]!r} and test {test[key]!r} are the same documents (split {key[-1]!r} of the "
            f"same data); lm-eval scores a YAML's test_split unless told otherwise: write e.g. "
            f"dev: \"{_path_of(dev[key])}:validation\", test: \"{_path_of(test[key])}:test\""
        )


def _path_of(item: str) -> str:
    from search.fitness.lm_eval import split_item

    return split_item(item)[0]


def _lm_eval_identities(data: str, where: str) -> Iterator[tuple[str, tuple]]:
    """(item, identity of the documents it scores) for each item of an lm_eval DATA string."""
    from search.fitness.lm_eval import SPLIT_KEYS, is_yaml, split_item

    for part in data.split(","):
        item, split = split_item(part)
        if not item:
            continue
        if not is_yaml(item):  # a registry task: its YAML is not read here; the split word is its identity
            yield part.strip(), ("registry", item, SPLIT_KEYS[split] if split else None)
            continue
        path = Path(item)
        config = read_task_yaml(path, where)
        if split is None:
            name = config.get("test_split") or config.get("validation_split")
            if not name:
                raise ConfigError(f"{where}: {item}: the lm-eval task has neither test_split nor validation_split")
        else:
            key = SPLIT_KEYS[split]
            name = config.get(key)
            if not name:
                raise ConfigError(f"{where}: {item}: the lm-eval task has no {key} (asked for :{split})")
            if split != "train" and config.get("validation_split") and config.get("validation_split") == config.get("test_split"):
                raise ConfigError(
                    f"{where}: {item}: validation_split and test_split are both {name!r}: dev and test cannot be told apart"
                )
        yield part.strip(), ("yaml", _dataset_identity(config, name, path), name)


def read_task_yaml(path: Path, where: str = "lm_eval") -> dict:
    """An lm-eval task YAML as a dict, its `include:` merged under it (as lm-eval does);
    `!function x.y` tags are kept as text, never run."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, suffix, node):
        value = loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else str(node.value)
        return f"!{suffix} {value}"

    Loader.add_multi_constructor("!", tagged)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: {path}: cannot be read as an lm-eval task YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {path}: an lm-eval task YAML must be a mapping")
    include = config.pop("include", None)
    if include:
        base = path.parent / include
        config = {**read_task_yaml(base if base.is_file() else Path(include), where), **config}
    return config


def _dataset_identity(config: dict, split: str, yaml_path: Path) -> str:
    """What `datasets.load_dataset(...)[split]` reads for this task config, as a hash: the
    dataset's path and name, its other load arguments, the content of the local files behind the
    split, and the task's `process_docs`."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.pop("data_files", None)
    if isinstance(files, dict):
        files = files.get(split)
    files = [files] if isinstance(files, str) else list(files or [])
    contents = []
    for name in files:
        path = Path(name)
        if not path.is_file() and (yaml_path.parent / name).is_file():
            path = yaml_path.parent / name
        contents.append(_sha256(path.read_bytes()) if path.is_file() else f"remote {name}")
    identity = [config.get("dataset_path"), config.get("dataset_name"), kwargs, sorted(contents),
                config.get("process_docs"), None if contents else split]
    return _sha256(json.dumps(identity, sort_keys=True, default=str).encode())


def resolve_lm_eval_paths(config: RunConfig, base_dir: Path | None) -> None:
    """lm_eval YAML items that exist relative to the config's directory (but not the current
    one) are rewritten to that path, as `check_data` does for data files; a missing one fails."""
    from search.fitness.lm_eval import is_yaml, split_item

    for i, task in enumerate(config.tasks):
        if task.kind != "lm_eval":
            continue
        for side in ("dev", "test"):
            parts = []
            for part in getattr(task, side).split(","):
                item, split = split_item(part)
                if item and is_yaml(item):
                    path = beside_config(item, base_dir, Path.is_file)
                    if not path.is_file():
                        raise ConfigError(f"tasks[{i}].{side}: no such lm-eval task YAML {item!r}")
                    item = str(path)
                parts.append(f"{item}:{split}" if split else item)
            setattr(task, side, ",".join(parts))


# --------------------------------------------------------------------------- the plan space


def check_recipe_layers(config: RunConfig, model_config: Any = None) -> None:
    """`recipe.layer_groups` at most the base model's decoder layers (exit 2 naming the field)."""
    model_config = model_config if model_config is not None else base_model_config(config)
    num_layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None)
    if num_layers and config.recipe.layer_groups > num_layers:
        raise ConfigError(f"recipe.layer_groups: {config.recipe.layer_groups} is more than the base model's {num_layers} layers")


def base_model_config(config: RunConfig):
    """The base model's transformers config, read without loading weights; None when it cannot
    be read (the run then says what is wrong when it loads the model)."""
    from transformers import AutoConfig, LlamaConfig

    from search.models.sources import BUILTINS, cache_root

    source = config.parents.base.source
    try:
        if source in BUILTINS:
            cached = cache_root() / "models" / source
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            if source == "tiny-llama":
                from search.models.tiny import tiny_llama_config

                return tiny_llama_config()
            return LlamaConfig(**SMOLLM2_135M_CONFIG)
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None


def space_steps(space, num_layers: int) -> Iterator[tuple[str, dict, str]]:
    """(field, plan step, what differs from the op's first step) for every op the space can
    choose: first at its weakest setting with its first choices, then one choice or range end
    changed at a time."""
    from search.tuning.space import block_count_range

    def varied(field: str, step: dict, key: str, value) -> tuple[str, dict, str]:
        return field, {**step, key: value}, f" with {key}={value}"

    low, high = block_count_range(space, num_layers)
    for op in (o for o in space.depth if o != "none"):
        step = {"op": op, "count": low, "importance": space.importance[0]}
        if op == "fuse_blocks":
            step.update(rank=space.fuse_rank.low, steps=space.fuse_steps.low)
        yield "compress.space.depth", step, ""
        yield from (varied("compress.space.importance", step, "importance", i) for i in space.importance[1:])
        yield varied("compress.space.block_count.high", step, "count", high)
        if op == "fuse_blocks":
            yield varied("compress.space.fuse_rank.high", step, "rank", space.fuse_rank.high)
    for op in (o for o in space.width if o != "none"):
        step = {"op": op, "ratio": space.width_ratio.low, "target": space.width_target[0],
                "criterion": space.criterion[0], "reconstruct": space.reconstruct[0]}
        yield "compress.space.width", step, ""
        for key, field in (("target", "width_target"), ("criterion", "criterion"), ("reconstruct", "reconstruct")):
            yield from (varied(f"compress.space.{field}", step, key, v) for v in getattr(space, field)[1:])
        yield varied("compress.space.width_ratio.high", step, "ratio", space.width_ratio.high)
    for op in (o for o in space.ttm if o != "none"):
        step = {"op": op, "rank": space.ttm_rank.high, "modules": space.ttm_modules}
        yield "compress.space.ttm", step, ""
        yield varied("compress.space.ttm_rank.low", step, "rank", space.ttm_rank.low)


def check_space_architecture(config: RunConfig, model_config: Any = None) -> None:
    """Refuse a compress / joint config whose plan space holds an op, choice or range end that
    cannot change the base model (exit 2 naming the field), before any expert is built. A recipe
    run's layer groups must fit the model's layers."""
    if config.mode == "recipe":
        return check_recipe_layers(config, model_config)
    if config.mode == "merge":
        return
    from compression.errors import CompressionError
    from compression.plan import check_plan, parse_step

    model_config = model_config if model_config is not None else base_model_config(config)
    if model_config is None:
        return
    num_layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None) or 1
    model_type = getattr(model_config, "model_type", "?")
    for field, step, what in space_steps(config.compress.space, num_layers):
        try:
            check_plan([parse_step(step, "step")], model_config)
        except CompressionError as exc:
            reason = str(exc).splitlines()[0].removeprefix("plan[0].").removeprefix("step.")
            fix = "narrow the range" if field.endswith((".low", ".high")) else "take it out of the space"
            raise ConfigError(
                f"{field}: {step['op']!r}{what} cannot change the base model (model_type {model_type!r}): {reason}; {fix}"
            ) from None


__all__ = [
    "preflight", "check_dev_test_distinct", "check_space_architecture", "resolve_lm_eval_paths", "read_task_yaml",
    "base_model_config", "space_steps", "file_documents", "SMOLLM2_135M_CONFIG",
]
