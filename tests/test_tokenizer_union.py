"""`tokenizer_source: union` (and `tokenizer: {source, tokens, pad_to_multiple_of}`) in `evofuse merge`.

Three tiny Llamas whose word-level tokenizers differ: `a` (the base), `b` (other ids, two words
`a` lacks), `c` (a's vocabulary plus an added special token and an added word). Checked: the union
vocabulary, each output row against a hand re-indexing and a hand merge (linear with and without a
base, slerp), loading with plain transformers (tied embeddings too), mergekit 0.1.5 in process on
the same models (row by row, by token: mergekit's ids of appended tokens follow hash order), and
bad input as one line naming the field (exit 2 from the command line).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from search.merge import MergeConfigError, run_merge

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = {"a": ["the", "cat", "sat", "on", "a"],
         "b": ["a", "dog", "the", "ran", "on"],  # other ids; "dog" and "ran" are new, "cat" and "sat" missing
         "c": ["the", "cat", "sat", "on", "a"]}
ADDED = {"c": [("<tool>", True), ("mat", False)]}  # (token, special)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def word_tokenizer(words: list[str], added: list[tuple[str, bool]]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for token, special in added:
        tokenizer.add_tokens([token], special_tokens=special)
    return tokenizer


def save_models(root: Path, tied: bool = False) -> dict[str, Path]:
    from search.models.tiny import tiny_llama

    paths = {}
    for seed, label in enumerate(WORDS):
        tokenizer = word_tokenizer(WORDS[label], ADDED.get(label, []))
        model = tiny_llama(seed=seed, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=tied, pad_token_id=None)
        paths[label] = root / label
        model.save_pretrained(paths[label])
        tokenizer.save_pretrained(paths[label])
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_models(tmp_path_factory.mktemp("union_models"))


def _run(config: dict, tmp_path: Path, name: str = "out") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return run_merge(path, tmp_path / name, quiet=True)


def _state(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _vocab(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def _linear(models, weights: dict[str, float], **extra) -> dict:
    return {"merge_method": "linear", "tokenizer_source": "union",
            "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in weights.items()], **extra}


# (a) the union vocabulary: the base's ids, then others' own tokens (model and id order), then added tokens
UNION = {"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3, "cat": 4, "sat": 5, "on": 6, "a": 7,
         "dog": 8, "ran": 9, "<tool>": 10, "mat": 11}


def test_union_vocabulary_and_config(models, tmp_path):
    out = _run(_linear(models, {"a": 0.5, "b": 0.3, "c": 0.2}), tmp_path)
    assert _vocab(out) == UNION
    state = _state(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 12
    assert state[EMBED].shape == state[HEAD].shape == (12, 32)


def hand_rows(models: dict[str, Path], labels: list[str], tensor: str, base: str | None,
              vocab: dict[str, int] = UNION) -> dict[str, torch.Tensor]:
    """Each model's [len(vocab), 32] rows in `vocab`, by a plain loop over tokens: its own row when
    it has the token; else the base's when the base has it; else the mean of the owners' rows."""
    own = {m: _state(models[m])[tensor] for m in labels}
    ids = {m: _vocab(models[m]) for m in labels}
    rows = {m: torch.empty(len(vocab), own[m].shape[1]) for m in labels}
    for token, i in vocab.items():
        owners = [m for m in labels if token in ids[m]]
        if base in owners:
            default = own[base][ids[base][token]]
        else:
            default = sum(own[m][ids[m][token]] for m in owners) / len(owners)
        for m in labels:
            rows[m][i] = own[m][ids[m][token]] if token in ids[m] else default
    return rows


@pytest.mark.parametrize("base", [None, "a"])
def test_linear_rows_are_the_merge_of_each_tokens_rows(models, tmp_path, base):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    extra = {"base_model": str(models[base])} if base else {}
    state = _state(_run(_linear(models, weights, **extra), tmp_path))
    for tensor in (EMBED, HEAD):
        rows = hand_rows(models, list(weights), tensor, base)
        expected = sum(w * rows[m] for m, w in weights.items()) / sum(weights.values())
        assert float((state[tensor] - expected).abs().max()) <= 1e-6, tensor
    # "dog" is b's alone: every model brings b's row, so the merge is that row
    assert torch.allclose(state[EMBED][UNION["dog"]], _state(models["b"])[EMBED][_vocab(models["b"])["dog"]], atol=1e-6)


def test_slerp_interpolates_the_reindexed_tensors(models, tmp_path):
    t = 0.3
    config = {"merge_method": "slerp", "base_model": str(models["a"]), "tokenizer_source": "union",
              "models": [{"model": str(models["a"])}, {"model": str(models["b"])}], "parameters": {"t": t}}
    out = _run(config, tmp_path)
    state, vocab = _state(out), _vocab(out)
    assert vocab == {token: i for token, i in UNION.items() if i < 10}  # a's, then b's "dog" and "ran"
    for tensor in (EMBED, HEAD):
        rows = hand_rows(models, ["a", "b"], tensor, "a", vocab)
        v0, v1 = rows["a"], rows["b"]
        cos = float((v0 / v0.norm() * v1 / v1.norm()).sum())  # the whole tensors' angle, as mergekit's slerp
        theta = math.acos(cos)
        expected = math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1
        assert float((state[tensor] - expected).abs().max()) <= 1e-6, tensor


@pytest.mark.parametrize("tied", [False, True])
def test_output_loads_with_plain_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = save_models(tmp_path / "models", tied=tied)
    out = _run(_linear(models, {"a": 1.0, "b": 1.0, "c": 1.0}), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tokenizer("the dog sat on the mat <tool>", add_special_tokens=False)["input_ids"]
    assert ids == [UNION[w] for w in "the dog sat on the mat <tool>".split()]
    assert tokenizer.decode(ids).split() == "the dog sat on the mat <tool>".split()
    assert model.config.vocab_size == len(tokenizer) == model.model.embed_tokens.weight.shape[0] == 12
    assert ("lm_head.weight" in _state(out)) != tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 12) and torch.isfinite(logits).all()


def test_tokens_overrides_and_padding(models, tmp_path):
    a, b, c = (str(models[m]) for m in "abc")
    config = _linear(models, {"a": 0.5, "b": 0.3, "c": 0.2})
    del config["tokenizer_source"]
    config["tokenizer"] = {"source": "union", "pad_to_multiple_of": 16, "tokens": {
        "cat": {"source": c},  # b lacks "cat": it brings c's row instead of the mean of a's and c's
        "<tool>": {"source": {"kind": "zero"}},  # a and b lack it: zero for them
        "the": {"source": {"kind": "model_token", "model": b, "token": "dog"}, "force": True},  # every model: b's "dog"
        "zebra": {"source": {"kind": "zero"}},  # a new token: zero everywhere
    }}
    out = _run(config, tmp_path)
    state, vocab = _state(out), _vocab(out)
    assert vocab == {**UNION, "zebra": 12}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16 and state[EMBED].shape == (16, 32)
    own = {m: _state(models[m])[EMBED] for m in "abc"}
    ids = {m: _vocab(models[m]) for m in "abc"}
    row = {m: lambda token, m=m: own[m][ids[m][token]] for m in "abc"}
    close = lambda got, want: torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # noqa: E731
    close(state[EMBED][vocab["cat"]], 0.5 * row["a"]("cat") + 0.5 * row["c"]("cat"))  # weights 0.5 a + (0.3 + 0.2) c
    close(state[EMBED][vocab["<tool>"]], 0.2 * row["c"]("<tool>"))
    close(state[EMBED][vocab["the"]], row["b"]("dog"))
    assert not state[EMBED][vocab["zebra"]].any()
    padding = state[EMBED][13:]  # each model's padding rows are its mean row, so the merge's is the merged mean
    close(padding, state[EMBED][:13].mean(dim=0).expand(3, -1))


# (d) mergekit 0.1.5 in process on the same models and YAML

def _mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    mergekit_run(MergeConfiguration.model_validate(config), str(out),
                 MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=True))


PARITY = {
    "linear_union": lambda p: _linear(p, {"a": 0.5, "b": 0.3, "c": 0.2}),
    "ties_union_with_base": lambda p: {
        "merge_method": "ties", "base_model": str(p["a"]), "tokenizer_source": "union", "dtype": "float32",
        "models": [{"model": str(p[m]), "parameters": {"weight": 0.6, "density": 0.5}} for m in "bc"]},
    # mergekit's tokenizer base without base_model is any referenced model (set order): name it
    "linear_tokenizer_base": lambda p: {**_linear(p, {"a": 0.5, "b": 0.5}), "tokenizer_source": "base",
                                        "base_model": str(p["a"])},
    "linear_tokenizer_of_a_model": lambda p: {**_linear(p, {"a": 0.5, "b": 0.5}), "tokenizer_source": str(p["c"])},
    "slerp_union": lambda p: {
        "merge_method": "slerp", "base_model": str(p["b"]), "tokenizer_source": "union", "parameters": {"t": 0.4},
        "models": [{"model": str(p["b"])}, {"model": str(p["c"])}]},
    # embeddings from a alone, the head from b alone: a token its one model lacks gets a zero row
    "passthrough_slices_union": lambda p: {
        "merge_method": "passthrough", "tokenizer_source": "union",
        "slices": [{"sources": [{"model": str(p["a"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(p["b"]), "layer_range": [1, 2]}]}]},
    "linear_tokens_padding": lambda p: {
        **{k: v for k, v in _linear(p, {"a": 0.5, "b": 0.3, "c": 0.2}).items() if k != "tokenizer_source"},
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
            "cat": {"source": str(p["c"])}, "<tool>": {"source": {"kind": "zero"}},
            "the": {"source": {"kind": "model_token", "model": str(p["b"]), "token_id": 4}, "force": True},
            "zebra": {"source": {"kind": "zero"}}}}},
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_rows_match_mergekit_token_by_token(models, tmp_path, name):
    pytest.importorskip("mergekit", reason="mergekit is not installed: `.venv/bin/pip install mergekit==0.1.5`")
    config = PARITY[name](models)
    ours_dir = _run(config, tmp_path, "evofuse")
    _mergekit(config, tmp_path / "mergekit")
    ours, theirs = _state(ours_dir), _state(tmp_path / "mergekit")
    ours_vocab, theirs_vocab = _vocab(ours_dir), _vocab(tmp_path / "mergekit")
    assert set(ours_vocab) == set(theirs_vocab) and set(ours) == set(theirs)
    size = json.loads((ours_dir / "config.json").read_text())["vocab_size"]
    assert size == json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"]
    # mergekit's appended tokens come in hash order: compare rows by token, padding rows as they are
    order = torch.tensor([theirs_vocab[token] for token in sorted(ours_vocab, key=ours_vocab.get)]
                         + list(range(len(ours_vocab), size)))
    for tensor in ours:
        expected = theirs[tensor][order] if tensor in (EMBED, HEAD) else theirs[tensor]
        assert ours[tensor].shape == expected.shape, tensor
        assert float((ours[tensor] - expected).abs().max()) <= 1e-6, tensor


# bad input: one line naming the field

@pytest.mark.parametrize("mutate, message", [
    (lambda c, p: c.update(tokenizer={"source": "union"}), "give either 'tokenizer_source' or 'tokenizer'"),
    (lambda c, p: c.update(tokenizer_source=None, tokenizer={"source": "union", "tokens": {"cat": {"source": "/x"}}}),
     "field 'tokenizer.tokens.cat.source': '/x' is not one of the merged models"),
    (lambda c, p: c.update(tokenizer_source=None, tokenizer={"source": "union", "tokens": {"cat": {}}}),
     "field 'tokenizer.tokens.cat.source': a source is needed"),
    (lambda c, p: c.update(tokenizer_source=None,
                           tokenizer={"source": "union", "tokens": {"cat": {"source": str(p["b"])}}}),
     "has no token 'cat'"),
    (lambda c, p: c.update(tokenizer_source=None, tokenizer={"source": "union", "tokens": {"cat": {"forse": True}}}),
     "field 'tokenizer.tokens.cat.forse' is not supported by evofuse merge (supported: source, force)"),
    (lambda c, p: c.update(tokenizer_source=None, tokenizer={"source": "union", "pad_to_multiple_of": 0}),
     "field 'tokenizer.pad_to_multiple_of'"),
])
def test_bad_tokenizer_fields_are_one_line(models, tmp_path, mutate, message):
    config = _linear(models, {"a": 0.5, "b": 0.5})
    mutate(config, models)
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MergeConfigError) as info:
        run_merge(path, tmp_path / "out", quiet=True)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unmatched_embeddings_exit_2_naming_the_field(models, tmp_path, capsys, cli_stderr):
    from search.cli import main
    from search.models.tiny import tiny_llama

    wide = tmp_path / "wide"  # another hidden size: its embedding rows cannot be merged with a's
    tiny_llama(seed=5, vocab_size=8, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2).save_pretrained(wide)
    word_tokenizer(WORDS["b"], []).save_pretrained(wide)
    short = tmp_path / "short"  # a tokenizer with ids past the embedding's rows
    tiny_llama(seed=6, vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2).save_pretrained(short)
    word_tokenizer(WORDS["c"], ADDED["c"]).save_pretrained(short)
    config_json = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config_json, "vocab_size": 10}))
    capsys.readouterr()  # saving the models above prints progress bars
    for odd, message in ((wide, "tensor 'lm_head.weight' has shape [10, 48]"),
                         (short, "field 'models.1.model': its tokenizer has 'mat' at id 9, past the 8 rows")):
        config = _linear(models, {"a": 0.5})
        config["models"].append({"model": str(odd), "parameters": {"weight": 0.5}})
        path = tmp_path / "bad.yml"
        path.write_text(yaml.safe_dump(config))
        assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
        err = cli_stderr()
        assert err.count("\n") == 0 and message in err, err


def _weights_only(model: Path, out: Path) -> Path:
    """A copy of a model directory without its tokenizer files."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((model / name).read_bytes())
    return out


def test_a_model_without_tokenizer_has_the_bases_vocabulary(models, tmp_path):
    """mergekit: a model whose tokenizer cannot be loaded is taken to share the base's (a warning)."""
    config = _linear(models, {"a": 0.5})
    bare = _weights_only(models["a"], tmp_path / "bare")
    config["models"].append({"model": str(bare), "parameters": {"weight": 0.5}})
    with pytest.warns(UserWarning, match="using the base's vocabulary"):
        out = _run(config, tmp_path)
    assert _vocab(out) == _vocab(models["a"])
    assert torch.equal(_state(out)[EMBED], _state(models["a"])[EMBED])  # a merged with itself


def test_a_base_without_tokenizer_is_one_line(models, tmp_path):
    config = _linear(models, {"a": 0.5})
    bare = _weights_only(models["a"], tmp_path / "bare")
    config["models"].insert(0, {"model": str(bare), "parameters": {"weight": 0.5}})
    with pytest.raises(MergeConfigError, match="field 'models.0.model': cannot load a tokenizer from") as info:
        _run(config, tmp_path)
    assert "\n" not in str(info.value)
