"""Scoring kernels: tokenising as lm-eval does, windows, batching, and the model calls.

Every function here is plain: token ids in, floats out. The task kinds build on them.

Tokenisation (lm-evaluation-harness v0.4.13's `HFLM`). `encode(text)` is
`tokenizer.encode(text)` with the tokenizer's default special tokens (so a Llama-2 style
tokenizer adds BOS, a GPT-2/SmolLM2 one adds nothing), except that a text already starting with
the prefix token's string is encoded without special tokens. The prefix token is BOS, or EOS
when the tokenizer has no BOS. L (`model_max_length`) is the model config's `n_positions` /
`max_position_embeddings` / `n_ctx`, else the tokenizer's `model_max_length`, else 2048
(lm-eval's `resolve_max_length`).

Model calls run under `torch.inference_mode`, send inputs to `model.device` (CUDA/bf16 works)
and always compute log-probabilities in float32. Batches are length-sorted and bounded by
`batch_tokens` padded tokens (and `batch_size` rows when given).

A forward pass that scores every position returns (rows, width, vocabulary) logits, so with a
large vocabulary the logits, not the weights, are a scoring pass's largest tensor: 8,192 tokens
of SmolLM2's 49,152-token vocabulary in float32 are 1.6 GB, three times the model. Unless a task
sets `batch_tokens`, `sequence_logprobs` therefore bounds a batch by BATCH_BUDGET_BYTES of
logits (`default_batch_tokens`); batching moves the scores only by float rounding (a relative
4e-9 on the demo's pydoc task: benchmarks/bench_scoring_memory.py). Shared-prefix scoring
(multiple choice) holds a key/value cache row per choice as well, which for a large model
outweighs the logits (a 7B model with 32 layers of 32 key/value heads of 128 dims caches 1 MiB
per token in float32); its batches are bounded by the same budget over both (`choice_batches`).
"""
from __future__ import annotations

import inspect
import random
from typing import Sequence

import torch
import torch.nn.functional as F

from search.fitness.spec import TaskError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer names one
DEFAULT_BATCH_TOKENS = 8192
BATCH_BUDGET_BYTES = 256 * 2**20  # one batch's logits (and key/value cache, when it keeps one)
IGNORE = -100  # cross_entropy's ignore_index: positions not scored


# --------------------------------------------------------------------------- tokenisation, lengths


def prefix_token_id(tokenizer) -> int:
    """The token that conditions the first prediction: BOS, else EOS (lm-eval's HFLM)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise TaskError("tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token


def encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `tok_encode`: default special tokens, unless the text already starts with the prefix."""
    prefix = tokenizer.decode([prefix_token_id(tokenizer)])
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split of the joint tokenisation (TemplateLM._encode_pair).

    Trailing whitespace of the context moves to the front of the continuation; the continuation's
    tokens are those of encode(context + continuation) after encode(context), so a merge across
    the boundary counts for the continuation. An empty context becomes [prefix].
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def language_config(config):
    """The language model's part of a config: a multimodal config's `text_config`, else itself."""
    return getattr(config, "text_config", None) or config


def model_max_length(model, tokenizer) -> int:
    """lm-eval's `resolve_max_length`: config positions, else tokenizer limit, else 2048."""
    config = language_config(getattr(model, "config", None))
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """lm-eval's disjoint rolling windows as (sequence, n_scored) pairs.

    The model reads sequence[:-1] and predicts sequence[1:]; only the last n_scored predictions
    count. With seq = [prefix] + tokens, window k predicts tokens[done : done + m] from the L
    tokens of seq just before its last target: every token is predicted exactly once.
    """
    if not tokens:
        return []
    seq = [prefix, *tokens]
    first = min(max_len, len(tokens))
    windows = [(seq[: first + 1], first)]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, max_len)
        end = done + count  # exclusive end in `tokens`; seq index is +1
        windows.append((seq[end - max_len : end + 1], count))
        done = end
    return windows


def length_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int | None) -> list[list[int]]:
    """Indices grouped longest first so a batch pads to its first item's length.

    A batch holds as many items as fit in `batch_tokens` padded tokens (always at least one),
    and at most `batch_size` items when given.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        full = (len(current) + 1) * max(width, 1) > batch_tokens or (batch_size and len(current) >= batch_size)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def subsample_indices(n: int, subsample: int | float | None, seed: int) -> list[int]:
    """Sorted item indices to score: all, k of them, or a fraction, drawn by Random(seed)."""
    if subsample is None:
        return list(range(n))
    if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or subsample <= 0:
        raise TaskError(f"subsample: expected a count > 0 or a fraction in (0, 1], got {subsample!r}")
    if isinstance(subsample, float):
        if subsample > 1:
            raise TaskError(f"subsample: a fraction must be in (0, 1], got {subsample}")
        k = max(1, round(subsample * n))
    else:
        k = subsample
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


# --------------------------------------------------------------------------- small tensor helpers


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None, left: bool = False) -> torch.Tensor:
    """(len(rows), width) long tensor of the rows, padded with `value` on the right (or left)."""
    width = width if width is not None else max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.as_tensor(row)
            else:
                out[i, : len(row)] = torch.as_tensor(row)
    return out


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position in float32; 0 where target == IGNORE.  (B, T, V), (B, T) -> (B, T)

    Row by row, so the float32 log-softmax temporary is (T, V), not (B, T, V).
    """
    targets = targets.to(logits.device)
    rows = [
        F.cross_entropy(logits[b].float(), targets[b], ignore_index=IGNORE, reduction="none")  # (T,)
        for b in range(logits.shape[0])
    ]
    return torch.stack(rows)  # (B, T)


def default_batch_tokens(model) -> int:
    """Padded tokens per batch when a task sets none: DEFAULT_BATCH_TOKENS, or fewer when that
    many positions' float32 logits (4 bytes x vocabulary each) would pass BATCH_BUDGET_BYTES
    (SmolLM2's 49,152-token vocabulary: 1,365 tokens, ten 128-token pieces)."""
    vocab = model.config.vocab_size
    return max(1, min(DEFAULT_BATCH_TOKENS, BATCH_BUDGET_BYTES // (4 * vocab)))


def kv_bytes_per_token(model) -> int | None:
    """Bytes one token's keys and values take in the cache over all layers, or None when the
    config does not say: 2 x layers x key/value heads x head dim x the parameters' element size
    (SmolLM2-135M in float32: 2 x 30 x 3 x 64 x 4 = 46,080)."""
    config = language_config(model.config)
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next(model.parameters()).element_size()
    except (AttributeError, TypeError, StopIteration):
        return None
    return 2 * layers * kv_heads * head_dim * element


def choice_batch_bytes(context: int, rows: int, width: int, questions: int, kv_bytes: int, vocab: int) -> int:
    """Memory of one `shared_prefix_logprobs` batch: `rows` choice rows, each holding its
    question's context (padded to `context` tokens) and `width` choice inputs in the cache, and
    float32 logits for rows x width choice positions plus each question's first-token logits
    and their log-softmax (2 x questions rows)."""
    return rows * (context + width) * kv_bytes + (rows * width + 2 * questions) * 4 * vocab


def choice_batches(model, questions: Sequence, batch_tokens: int | None = None,
                   batch_size: int | None = None) -> list[list[int]]:
    """Question indices grouped for `shared_prefix_logprobs`, longest first.

    By default a batch's padded cache rows and logits stay within BATCH_BUDGET_BYTES
    (`choice_batch_bytes`; one question always fits): the cache, not the logits, is what grows
    with a model's size. With `batch_tokens`, or a config that does not give the cache's size,
    a question costs its context plus its choices in padded tokens, as `length_batches` counts.
    """
    kv, vocab = kv_bytes_per_token(model), model.config.vocab_size
    if batch_tokens or kv is None:
        costs = [len(q.context) + sum(len(c) for c in q.continuations) for q in questions]
        return length_batches(costs, batch_tokens or DEFAULT_BATCH_TOKENS, batch_size)
    shapes = [(len(q.context), len(q.continuations), max(1, max(map(len, q.continuations)) - 1)) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: -(shapes[i][0] + shapes[i][2]))
    batches: list[list[int]] = []
    current: list[int] = []
    context = rows = width = 0
    for i in order:
        t, n, w = shapes[i]
        grown = choice_batch_bytes(max(context, t), rows + n, max(width, w), len(current) + 1, kv, vocab)
        if current and (grown > BATCH_BUDGET_BYTES or (batch_size and len(current) >= batch_size)):
            batches.append(current)
            current, context, rows, width = [], 0, 0, 0
        current.append(i)
        context, rows, width = max(context, t), rows + n, max(width, w)
    if current:
        batches.append(current)
    return batches


def accepts(model, argument: str) -> bool:
    """Whether `model.forward` takes a keyword `argument` (e.g. `logits_to_keep`)."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def progress_bar(items, enabled: bool, desc: str):
    """`items`, wrapped in a tqdm bar on stderr when enabled."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


# --------------------------------------------------------------------------- model calls


@torch.inference_mode()
def sequence_logprobs(
    model,
    sequences: Sequence[tuple[Sequence[int], int]],
    *,
    batch_tokens: int | None = None,
    batch_size: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
) -> list[float]:
    """Sum of log p over the last n_scored predictions of each (sequence, n_scored).

    Right padding and no attention mask, as lm-eval: a causal model's real positions never see
    the padding that follows them. One forward pass per length-sorted batch, of `batch_tokens`
    padded tokens (default: `default_batch_tokens`, which bounds the batch's logits).
    """
    device = model.device
    totals = [0.0] * len(sequences)
    batch_tokens = batch_tokens or default_batch_tokens(model)
    batches = length_batches([len(s) - 1 for s, _ in sequences], batch_tokens, batch_size)
    for batch in progress_bar(batches, progress, "scoring"):
        inputs = pad_rows([sequences[i][0][:-1] for i in batch], pad_id)  # (B, W)
        targets = torch.full_like(inputs, IGNORE)  # (B, W)
        for row, i in enumerate(batch):
            seq, n_scored = sequences[i]
            width = len(seq) - 1
            targets[row, width - n_scored : width] = torch.as_tensor(seq[width - n_scored + 1 :])
        logits = model(input_ids=inputs.to(device), use_cache=False).logits  # (B, W, V)
        sums = -token_nll(logits, targets).double().sum(dim=1)  # (B,)
        del logits  # before the next batch's forward, or both batches' logits are alive at once
        for row, i in enumerate(batch):
            totals[i] = float(sums[row])
    return totals


@torch.inference_mode()
def shared_prefix_logprobs(
    model, questions: Sequence, *, batch_tokens: int | None = None, batch_size: int | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Score each question's context once, then all its choices after it through the KV cache.

    A question is anything with `.context` (token ids) and `.continuations` (a list of them).
    Pass 1: contexts left-padded (attention mask, position ids counted from the first real
    token); the last position's log-softmax gives every choice's first token. The cache is then
    gathered so each choice row has its question's context. Pass 2: each choice minus its last
    token, right-padded, predicts the choice's tokens 2..m. Cost: sum(context) + sum(choices)
    tokens instead of n_choices * context + sum(choices). A batch is bounded by its choice rows'
    cache and logits (`choice_batches`).
    """
    device = model.device
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    results: list[list[float]] = [[] for _ in questions]
    batches = choice_batches(model, questions, batch_tokens, batch_size)
    for batch in progress_bar(batches, progress, "scoring choices"):
        group = [questions[i] for i in batch]
        ctx_lens = torch.tensor([len(q.context) for q in group])  # (B,)
        ctx_ids = pad_rows([q.context for q in group], 0, left=True)  # (B, Tc)
        ctx_mask = pad_rows([[1] * len(q.context) for q in group], 0, left=True)  # (B, Tc)
        positions = (ctx_mask.cumsum(1) - 1).clamp(min=0)  # (B, Tc)
        out = model(
            input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device), position_ids=positions.to(device),
            use_cache=True, **keep_last,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): log p(first choice token)
        owner = torch.tensor([b for b, q in enumerate(group) for _ in q.continuations])  # (R,) question of each row
        conts = [c for q in group for c in q.continuations]
        cache = out.past_key_values
        cache.batch_select_indices(owner.to(device))  # (R, heads, Tc, d) per layer
        inputs = pad_rows([c[:-1] for c in conts], 0, width=max(1, max(len(c) for c in conts) - 1))  # (R, Tk)
        targets = pad_rows([c[1:] for c in conts], IGNORE, width=inputs.shape[1])  # (R, Tk)
        # the new positions need no padding mask: a row's padding comes after its real tokens
        mask = torch.cat([ctx_mask[owner], torch.ones_like(inputs)], dim=1)  # (R, Tc + Tk)
        positions = ctx_lens[owner, None] + torch.arange(inputs.shape[1])  # (R, Tk)
        logits = model(
            input_ids=inputs.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            past_key_values=cache, use_cache=True,
        ).logits  # (R, Tk, V)
        rest = -token_nll(logits, targets).double().sum(dim=1)  # (R,)
        heads = first[owner.to(device), torch.tensor([c[0] for c in conts], device=device)].double()  # (R,)
        row_ll = (heads + rest).tolist()
        del out, cache, logits  # as in `sequence_logprobs`: one batch's tensors alive at a time
        r = 0
        for b, i in enumerate(batch):
            n = len(group[b].continuations)
            results[i] = row_ll[r : r + n]
            r += n
    return results


@torch.inference_mode()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, stop_mask_for) -> list[list[int]]:
    """Argmax decoding of a left-padded batch with a KV cache, until every row hit a stop token.

    `stop_mask_for(vocab_size)` gives a (V,) bool mask of the tokens that end a row.
    """
    device = model.device
    ids = pad_rows(prompts, 0, left=True).to(device)  # (B, T)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True).to(device)  # (B, T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    stop_mask = None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        if stop_mask is None:
            stop_mask = stop_mask_for(out.logits.shape[-1]).to(device)
        generated.append(next_token)
        done |= stop_mask[next_token]
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        out = model(
            input_ids=next_token[:, None], attention_mask=mask, position_ids=positions,
            past_key_values=out.past_key_values, use_cache=True,
        )
    return torch.stack(generated, dim=1).tolist()  # (B, steps)


__all__ = [
    "DEFAULT_MAX_LENGTH", "DEFAULT_BATCH_TOKENS", "BATCH_BUDGET_BYTES", "default_batch_tokens", "kv_bytes_per_token",
    "choice_batch_bytes", "choice_batches", "IGNORE", "prefix_token_id", "encode", "encode_pair",
    "model_max_length", "rolling_windows", "length_batches", "subsample_indices", "pad_rows", "token_nll",
    "accepts", "progress_bar", "sequence_logprobs", "shared_prefix_logprobs", "greedy_decode",
]
