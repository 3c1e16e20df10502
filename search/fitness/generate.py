"""The `generate` fitness kind: greedy decoding, scored by exact match or containment.

Data: JSONL `{"prompt": str, "answer": str}`.

Greedy decoding of at most `max_new_tokens` (default 32) tokens after encode(prompt) (left-cut
to L - max_new_tokens), batched with left padding and a KV cache (kernels.greedy_decode). The
output stops at EOS and is cut at the first stop string (option `stop`, default ["\\n"]).

    exact_match = mean [output.strip() == answer.strip()]
    contains    = mean [answer.strip() in output]
    score       = exact_match (option `match: contains` makes it `contains`)

Per example (one per prompt): value = 1.0 if the `score` metric holds for that prompt else 0.0,
weight = 1.0; sum(value) / sum(weight) = score.
"""
from __future__ import annotations

import torch

from search.fitness.base import FitnessTask, Scored, check_row, count_weighted
from search.fitness.kernels import DEFAULT_BATCH_TOKENS, encode, greedy_decode, length_batches, progress_bar
from search.fitness.spec import COMMON_OPTIONS, TaskError, TaskSpec, register_task_kind
from search.models.datasets import load_rows


def generate_rows(spec: str) -> list[tuple[str, str]]:
    """(prompt, answer) per row, both strings."""
    rows = []
    for n, row in enumerate(load_rows(spec), 1):
        check_row(spec, n, row, {"prompt": str, "answer": str})
        rows.append((row["prompt"], row["answer"]))
    return rows


@register_task_kind("generate", COMMON_OPTIONS | {"max_new_tokens", "match", "stop"})
class GenerateTask(FitnessTask):
    """Greedy answers to prompts, compared with the reference answers."""

    MATCHES = {"exact": "exact_match", "exact_match": "exact_match", "contains": "contains"}
    joins_metrics = True

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        match = self.option("match", self.option("metric", "exact"))
        if match not in self.MATCHES:
            raise TaskError(f"{self.label}: option match must be exact or contains, got {match!r}")
        self.metric = self.MATCHES[match]
        stop = self.option("stop", ["\n"])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise TaskError(f"{self.label}: option stop must be a non-empty string or a list of them")
        self.stop = stop
        self.max_new_tokens = self._int_option("max_new_tokens", 32)
        rows = generate_rows(spec.data)
        self.items = [(encode(tokenizer, prompt), answer) for prompt, answer in rows]
        self._stop_ids: dict[int, torch.Tensor] = {}

    def stop_token_mask(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: tokens whose text contains a stop string, or that end the sequence."""
        if vocab_size not in self._stop_ids:
            texts = self.tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(self.tokenizer)))])
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[: len(texts)] = torch.tensor([any(s in t for s in self.stop) for t in texts])
            for eos in self.eos_ids():
                if eos < vocab_size:
                    mask[eos] = True
            self._stop_ids[vocab_size] = mask
        return self._stop_ids[vocab_size]

    def eos_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} - {None}

    def _evaluate(self, model, indices, progress) -> Scored:
        prompts = [self.items[i][0] for i in indices]
        outputs = self.generate(model, prompts, progress)
        hits = {"exact_match": [], "contains": []}
        for i, text in zip(indices, outputs):
            answer = self.items[i][1].strip()
            hits["exact_match"].append(text.strip() == answer)
            hits["contains"].append(answer in text)
        metrics = {key: sum(flags) / len(indices) for key, flags in hits.items()}
        metrics = {"score": metrics[self.metric], **metrics, "prompts": float(len(indices))}
        return Scored(metrics, [float(h) for h in hits[self.metric]], [1.0] * len(indices))

    @classmethod
    def joined_metrics(cls, parts):
        """Every metric is a mean over prompts."""
        return count_weighted(parts, "prompts")

    def generate(self, model, prompts: list[list[int]], progress: bool = False) -> list[str]:
        """Greedy continuations of token prompts, cut at EOS and the first stop string."""
        keep = self.context_length(model) - self.max_new_tokens
        if keep < 1:
            raise TaskError(f"{self.label}: max_new_tokens {self.max_new_tokens} leaves no room for the prompt")
        prompts = [p[-keep:] for p in prompts]
        texts = [""] * len(prompts)
        budget = self.batching()
        lengths = [len(p) + self.max_new_tokens for p in prompts]
        batches = length_batches(lengths, budget["batch_tokens"] or DEFAULT_BATCH_TOKENS, budget["batch_size"] or 64)
        for batch in progress_bar(batches, progress, "generating"):
            new_tokens = greedy_decode(model, [prompts[i] for i in batch], self.max_new_tokens, self.stop_token_mask)
            for i, tokens in zip(batch, new_tokens):
                texts[i] = self.cut(tokens)
        return texts

    def cut(self, tokens: list[int]) -> str:
        """The text of generated tokens up to EOS, cut before the first stop string."""
        eos = self.eos_ids()
        end = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text


__all__ = ["GenerateTask", "generate_rows"]
