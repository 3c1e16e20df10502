"""The output vocabulary of a merge, and every model's embedding rows re-indexed to it.

mergekit 0.1.5's `tokenizer_source` / `tokenizer:` (what `evofuse merge` follows):

* absent: the reference model's tokenizer files are copied and no row moves (`search.merge`);
* `base` or a model: the output vocabulary is that tokenizer's; `union`: the base's tokenizer
  (the base model, else the first model) with every other model's missing tokens added to it,
  first the tokens of the models' own vocabularies (model by model, base first, each in id
  order), then their added tokens (same order). The new tokens join as added tokens, as in
  mergekit, so each matches its literal text. mergekit appends them in its dictionaries'
  (hash) order, so its ids of appended tokens vary between its runs; the set is the same;
* `tokens: {TOKEN: {source, force}}` sets where a token's row comes from (TOKEN is added to the
  vocabulary when missing): `source` is a model (that model's row of the token), `{kind: zero}`,
  or `{kind: model_token, model, token_id | token}` (a row of that model's own embedding);
  `force: true` gives every model that row, even one that has the token;
* `pad_to_multiple_of: N` rounds the row count up; the padding rows are each model's mean row.

Every vocabulary tensor (embeddings, LM head: vocabulary along axis 0) of every model is
re-indexed so output row i holds token i before the merge method sees it. A model that has the
token brings its own row; a model that lacks it brings the token's default row (mergekit's):
the row of the one model that has it; else the base's, when the base has it; else the mean of
the rows of the models that have it; zero when none has it. The merge method then combines rows
of one token. A model whose tokenizer cannot be loaded is taken to have the base's (a warning).

Where evofuse departs from mergekit: without `base_model` the base is the first model (mergekit
takes any one, from a set); a token at an id >= its model's config `vocab_size` counts as absent
(mergekit warns, then fails on the missing index); a base tokenizer with such tokens is refused
(mergekit strips them from BPE tokenizers); a `tokens:` entry that needs a source and has none is
a one-line error (mergekit raises NotImplementedError).
"""
from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from pydantic import field_validator, model_validator

from evolve.slices import split_layer_name
from search.errors import EvofuseError
from search.schema import Strict

__all__ = ["VocabularyError", "TokenizerEntry", "TokenEntry", "TokenizerSetting", "tokenizer_setting",
           "VocabularyPlan", "plan_vocabulary", "is_vocabulary_tensor", "aligned_index", "align_rows"]

# Tensors indexed by token along axis 0 (mergekit's `vocabulary_axis: 0`): input embeddings and
# LM heads of the usual architectures, outside the decoder layers.
VOCABULARY_TENSOR = re.compile(r"(?:^|\.)(embed_tokens|wte|tok_embeddings|word_embeddings|embed_in|lm_head|embed_out)"
                               r"\.weight$")


class VocabularyError(EvofuseError):
    """A vocabulary that cannot be built or matched; one line naming the field."""


# --- the config (mergekit's `tokenizer:` mapping) -------------------------------------------


class ModelTokenSource(Strict):
    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def one_of_id_or_token(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(Strict):
    kind: Literal["zero"]


class TokenEntry(Strict):
    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False


class TokenizerEntry(Strict):
    source: str = "union"  # union | base | a model (mergekit's default here is union)
    tokens: Optional[dict[str, TokenEntry]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a positive integer")
        return value


@dataclass(frozen=True)
class TokenizerSetting:
    source: str  # "union", "base" or a model reference
    tokens: dict[str, TokenEntry]
    pad_to_multiple_of: Optional[int]
    field: str  # the config field that named the source, for error messages


def tokenizer_setting(tokenizer_source: str | None, tokenizer: TokenizerEntry | None) -> TokenizerSetting | None:
    """The config's tokenizer choice in one form; None when the tokenizer is only copied."""
    if tokenizer is not None:
        return TokenizerSetting(tokenizer.source, dict(tokenizer.tokens or {}), tokenizer.pad_to_multiple_of,
                                "tokenizer.source")
    if tokenizer_source is not None:
        return TokenizerSetting(tokenizer_source, {}, None, "tokenizer_source")
    return None


# --- the vocabularies -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVocabulary:
    tokens: dict[str, int]  # every token of the model's tokenizer (added tokens included) -> id
    added: dict[int, Any]  # id -> the tokenizer's AddedToken
    size: int  # ids below this have an embedding row (config's vocab_size, else the tokenizer's)


def load_tokenizer(directory: Path, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise VocabularyError(f"field {field!r}: cannot load a tokenizer from {directory} ({first})") from None


def model_vocabulary(tokenizer, config: Mapping[str, Any]) -> ModelVocabulary:
    tokens = dict(tokenizer.get_vocab())
    size = config.get("vocab_size")
    return ModelVocabulary(tokens, dict(tokenizer.added_tokens_decoder),
                           size if isinstance(size, int) and size > 0 else len(tokens))


def tokens_to_append(base_vocab: Mapping[str, int], vocabularies: Sequence[ModelVocabulary]) -> tuple[list[str], list]:
    """(plain tokens, added tokens) the union adds to the base's tokenizer, in order.

    Plain: tokens of the models' own vocabularies the base lacks, model by model, in id order.
    Added: every model's added tokens (the first settings seen win); the base's own are no-ops.
    A token some model adds is only added once, with its added-token settings.
    """
    added: dict[str, Any] = {}
    for vocabulary in vocabularies:
        for index, info in sorted(vocabulary.added.items()):
            if index < vocabulary.size:
                added.setdefault(info.content, info)
    plain: dict[str, None] = {}
    for vocabulary in vocabularies:
        for token, index in sorted(vocabulary.tokens.items(), key=lambda item: item[1]):
            if index < vocabulary.size and token not in added and token not in base_vocab:
                plain.setdefault(token)
    return list(plain), list(added.values())


def union_tokenizer(tokenizer, vocabularies: Sequence[ModelVocabulary]):
    """The base's tokenizer (changed in place) with the other models' missing tokens added."""
    plain, added = tokens_to_append(tokenizer.get_vocab(), vocabularies)
    if plain:
        tokenizer.add_tokens(plain)
    if added:
        tokenizer.add_tokens(added)
    return tokenizer


def output_rows(vocab: Mapping[str, int], model: ModelVocabulary) -> torch.Tensor:
    """[len(vocab)] int64: output token id -> the model's row of that token, -1 when it lacks it."""
    rows = torch.full((len(vocab),), -1, dtype=torch.long)
    for token, out_id in vocab.items():
        index = model.tokens.get(token)
        if index is not None and index < model.size:
            rows[out_id] = index
    return rows


@dataclass(frozen=True)
class VocabularyPlan:
    tokenizer: Any  # the output tokenizer, saved beside the merge
    vocab: dict[str, int]  # output token -> output row
    size: int  # output rows: len(vocab), rounded up to pad_to_multiple_of
    rows: dict[str, torch.Tensor]  # per model: output row -> the model's row (-1: lacks the token)
    originals: dict[str, dict[str, int]]  # per model: its own vocabulary (for `token:` sources)
    tokens: dict[str, TokenEntry]  # the `tokens:` overrides

    def save(self, out_dir: Path) -> None:
        """The tokenizer's files, each written atomically."""
        from compression.loader import atomic_write_bytes

        with tempfile.TemporaryDirectory() as scratch:
            self.tokenizer.save_pretrained(scratch)
            for path in sorted(Path(scratch).iterdir()):
                if path.is_file():
                    atomic_write_bytes(out_dir / path.name, path.read_bytes())


def plan_vocabulary(setting: TokenizerSetting, models: Sequence[str], directories: Mapping[str, Path],
                    configs: Mapping[str, Mapping[str, Any]], fields: Mapping[str, str],
                    source_directory: Path | None = None) -> VocabularyPlan:
    """The output tokenizer and each model's rows in it. `models[0]` is the base (the base model,
    else the first model); `source_directory` is the tokenizer model's when the source is one."""
    base = models[0]
    base_tokenizer = load_tokenizer(directories[base], fields[base])
    vocabularies = {base: model_vocabulary(base_tokenizer, configs[base])}
    for model in models[1:]:
        try:
            vocabularies[model] = model_vocabulary(load_tokenizer(directories[model], fields[model]), configs[model])
        except VocabularyError as exc:  # mergekit: a model without a tokenizer has the base's
            warnings.warn(f"{exc}; using the base's vocabulary for it")
            vocabularies[model] = ModelVocabulary(vocabularies[base].tokens, vocabularies[base].added,
                                                  model_vocabulary(base_tokenizer, configs[model]).size)
    check_base_fits(vocabularies[base], setting, fields[base])
    # the vocabularies above are copies: the base's tokenizer itself can become the output's
    if setting.source == "union":
        tokenizer = union_tokenizer(base_tokenizer, list(vocabularies.values()))
    elif setting.source == "base":
        tokenizer = base_tokenizer
    else:
        tokenizer = load_tokenizer(source_directory, setting.field)
    new_tokens = [token for token in setting.tokens if token not in tokenizer.get_vocab()]
    if new_tokens:
        tokenizer.add_tokens(new_tokens)
    vocab = dict(tokenizer.get_vocab())
    if vocab and max(vocab.values()) >= len(vocab):  # rows are ids: they must be 0 .. len - 1
        raise VocabularyError(f"field {setting.field!r}: the output tokenizer's ids are not 0 .. {len(vocab) - 1} "
                              f"(it has id {max(vocab.values())}); its vocabulary cannot index embedding rows")
    size = padded_size(len(vocab), setting.pad_to_multiple_of)
    rows = {model: output_rows(vocab, vocabulary) for model, vocabulary in vocabularies.items()}
    plan = VocabularyPlan(tokenizer, vocab, size, rows, {m: v.tokens for m, v in vocabularies.items()},
                          setting.tokens)
    check_token_sources(plan, fields)
    return plan


def padded_size(count: int, multiple: int | None) -> int:
    return count if not multiple else -(-count // multiple) * multiple


def check_base_fits(base: ModelVocabulary, setting: TokenizerSetting, field: str) -> None:
    """mergekit strips a base tokenizer's tokens past its vocab_size (BPE only); evofuse refuses."""
    if setting.source in ("union", "base"):
        beyond = sorted((index, token) for token, index in base.tokens.items() if index >= base.size)
        if beyond:
            raise VocabularyError(f"field {field!r}: its tokenizer has {len(beyond)} tokens at ids >= its vocab_size "
                                  f"{base.size} (first {beyond[0][1]!r} at {beyond[0][0]}); a tokenizer with rows "
                                  f"for all its tokens is needed for tokenizer source {setting.source!r}")


def check_token_sources(plan: VocabularyPlan, fields: Mapping[str, str]) -> None:
    """Each `tokens:` source names a merged model, and a token or row that model has."""
    for token, entry in plan.tokens.items():
        problem = token_source_problem(plan, token, entry, fields)
        if problem:
            raise VocabularyError(f"field 'tokenizer.tokens.{token}.source': {problem}")


def token_source_problem(plan: VocabularyPlan, token: str, entry: TokenEntry, fields: Mapping[str, str]) -> str | None:
    source = entry.source
    if source is None:  # mergekit fails then too: nothing says where the row comes from
        if entry.force or any(int(rows[plan.vocab[token]]) < 0 for rows in plan.rows.values()):
            why = "force is set" if entry.force else "a model lacks the token"
            return f"a source is needed (a model, {{kind: zero}} or {{kind: model_token, ...}}) since {why}"
        return None
    if isinstance(source, ZeroSource):
        return None
    model = source if isinstance(source, str) else source.model
    if model not in plan.rows:
        return f"{model!r} is not one of the merged models ({', '.join(fields)})"
    if isinstance(source, str) and int(plan.rows[model][plan.vocab[token]]) < 0:
        return f"{model!r} has no token {token!r}"
    if isinstance(source, ModelTokenSource) and source.token is not None and source.token not in plan.originals[model]:
        return f"{model!r} has no token {source.token!r}"
    return None


# --- the rows -----------------------------------------------------------------------------------


def is_vocabulary_tensor(name: str) -> bool:
    return split_layer_name(name) is None and bool(VOCABULARY_TENSOR.search(name))


def aligned_index(index: Mapping[str, tuple], plan: VocabularyPlan, model: str, field: str) -> dict[str, tuple]:
    """A model's {tensor: (shape, dtype)} as the merge sees it: vocabulary tensors have the
    output's row count. A tokenizer id past a tensor's rows is refused, naming the model's field."""
    aligned = dict(index)
    needed = int(plan.rows[model].max()) + 1 if len(plan.rows[model]) else 0
    for name, (shape, dtype) in index.items():
        if is_vocabulary_tensor(name) and len(shape) >= 1:
            if needed > shape[0]:
                token = next(t for t, i in plan.originals[model].items() if i == needed - 1)
                raise VocabularyError(f"field {field!r}: its tokenizer has {token!r} at id {needed - 1}, past the "
                                      f"{shape[0]} rows of {name!r} (vocab_size in its config.json is too large?)")
            check_token_ids(plan, model, name, shape[0])
            aligned[name] = ((plan.size, *tuple(shape)[1:]), dtype)
    return aligned


def check_token_ids(plan: VocabularyPlan, model: str, name: str, rows: int) -> None:
    """A `tokens:` source's token_id of `model` is a row of its tensor `name`."""
    for token, entry in plan.tokens.items():
        source = entry.source
        if isinstance(source, ModelTokenSource) and source.model == model and source.token_id is not None:
            if not 0 <= source.token_id < rows:
                raise VocabularyError(f"field 'tokenizer.tokens.{token}.source.token_id': {source.token_id} is "
                                      f"outside the {rows} rows of {model!r}'s {name!r}")


def align_rows(plan: VocabularyPlan, tensors: Mapping[str, torch.Tensor], base: str | None) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor [rows_m, ...] as [plan.size, ...], output row i = token i.

    A model that has token i keeps its row; one that lacks it (or every model, for a forced
    `tokens:` entry) gets the token's default row d_i (see the module docstring):
        d_i = x_base[i]                        when the base has i and some model lacks it
        d_i = (0 + sum_{m has i} x_m[i]) / n_i   otherwise (n_i owners; n_i = 0 gives zero)
    """
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for tensor in tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    count = len(plan.vocab)
    has = torch.stack([plan.rows[m] >= 0 for m in models])  # [M, V] which model has which token
    forced = torch.zeros(count, dtype=torch.bool)
    for token, entry in plan.tokens.items():
        forced[plan.vocab[token]] = entry.force
    needs_default = ~has.all(dim=0) | forced  # [V]
    gathered = {m: tensors[m].to(dtype)[plan.rows[m].clamp(min=0)] for m in models}  # [V, ...] (absent rows: junk)
    ids = needs_default.nonzero().flatten()  # the few tokens some model lacks
    defaults = default_rows(plan, tensors, gathered, has, ids, base, models, dtype)  # [len(ids), ...]
    aligned = {}
    for k, m in enumerate(models):
        rows = gathered[m]
        keep_own = (has[k, ids] & ~forced[ids]).view(-1, *[1] * (rows.dim() - 1))
        rows[ids] = torch.where(keep_own, rows[ids], defaults)
        if plan.size > count:  # padding rows: the model's mean row (mergekit, after Hewitt's vocab expansion)
            rows = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(plan.size - count, *rows.shape[1:])])
        aligned[m] = rows
    return aligned


def default_rows(plan: VocabularyPlan, tensors: Mapping[str, torch.Tensor], gathered: Mapping[str, torch.Tensor],
                 has: torch.Tensor, ids: torch.Tensor, base: str | None, models: list[str],
                 dtype: torch.dtype) -> torch.Tensor:
    """[len(ids), ...]: the default row of each token in `ids`: a `tokens:` source, else the base's
    row when the base has the token, else the mean of its owners' rows (0 + x_1 + ... + x_n) / n."""
    owners = has[:, ids]  # [M, K]
    shape = (-1, *[1] * (gathered[models[0]].dim() - 1))
    total = torch.zeros((len(ids), *gathered[models[0]].shape[1:]), dtype=dtype)
    for k, m in enumerate(models):  # an absent model adds an exact 0: the sum of the owners, in model order
        total = total + torch.where(owners[k].view(shape), gathered[m][ids], 0)
    defaults = total / owners.sum(dim=0).clamp(min=1).view(shape).to(dtype)
    if base in models:
        from_base = owners[models.index(base)].view(shape)
        defaults = torch.where(from_base, gathered[base][ids], defaults)
    position = {int(i): k for k, i in enumerate(ids)}
    for token, entry in plan.tokens.items():
        k = position.get(plan.vocab[token])
        if k is not None and entry.source is not None:
            defaults[k] = token_source_row(plan, tensors, gathered, entry.source, token, dtype)
    return defaults


def token_source_row(plan: VocabularyPlan, tensors: Mapping[str, torch.Tensor], gathered: Mapping[str, torch.Tensor],
                     source: Any, token: str, dtype: torch.dtype) -> torch.Tensor:
    """The row a `tokens:` entry names: zero, a model's row of the token, or a row of a model's own tensor."""
    field = f"tokenizer.tokens.{token}.source"
    if isinstance(source, ZeroSource):
        return torch.zeros(gathered[next(iter(gathered))].shape[1:], dtype=dtype)
    model = source if isinstance(source, str) else source.model
    if model not in tensors:
        raise VocabularyError(f"field {field!r}: {model!r} is not among the models merged into this tensor")
    if isinstance(source, str):
        return gathered[model][plan.vocab[token]]
    index = source.token_id if source.token_id is not None else plan.originals[model][source.token]
    if not 0 <= index < tensors[model].shape[0]:
        raise VocabularyError(f"field {field!r}: token_id {index} is outside {model!r}'s "
                              f"{tensors[model].shape[0]} rows")
    return tensors[model][index].to(dtype)
