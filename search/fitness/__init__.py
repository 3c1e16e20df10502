"""Fitness tasks: what a candidate is scored on, with lm-evaluation-harness's conventions.

    spec.py             TaskSpec, TaskError, parse_task_arg, aggregate; the task-kind registry
                        (register_task_kind, build_task, TASK_KINDS)
    base.py             FitnessTask: evaluate(model, subsample=, seed=, indices=, per_example=)
    kernels.py          tokenising, rolling windows, length batching, the model-call kernels
    perplexity.py       kind `perplexity`: rolling log-likelihood of documents
    multiple_choice.py  kind `multiple_choice`: log-likelihood of each choice (acc, acc_norm)
    generate.py         kind `generate`: greedy decoding, exact match / contains
    lm_eval.py          kind `lm_eval`: lm-eval's own tasks on the in-memory model
    kl.py               kind `kl`: KL(dense reference || candidate) of next-token distributions
    staged.py           staged evaluation: paired statistics over per-example scores

Every kind module registers itself with `register_task_kind`; spec.py imports them by name the
first time a kind is looked up, so this package has no import cycle. tests/test_lm_eval_parity.py
checks the definitions against lm-eval itself.
"""
from compression.calibration import DataSpecError
from search.fitness.base import FitnessTask
from search.fitness.kernels import (
    encode,
    encode_pair,
    greedy_decode,
    length_batches,
    rolling_windows,
    sequence_logprobs,
    shared_prefix_logprobs,
    subsample_indices,
)
from search.fitness.spec import (
    TaskError,
    TaskSpec,
    aggregate,
    build_task,
    parse_task_arg,
    register_task_kind,
    task_kinds,
)
from search.run.latency import forward_latency_ms  # re-exported for now; it is not a task


def __getattr__(name: str):
    # TASK_KINDS comes from the registry, read on first use (PEP 562): importing the package
    # does not import every kind module.
    if name == "TASK_KINDS":
        return task_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TASK_KINDS", "TaskError", "TaskSpec", "FitnessTask", "DataSpecError", "parse_task_arg", "build_task",
    "aggregate", "register_task_kind", "task_kinds", "encode", "encode_pair", "rolling_windows",
    "length_batches", "subsample_indices", "sequence_logprobs", "shared_prefix_logprobs", "greedy_decode",
    "forward_latency_ms",
]
