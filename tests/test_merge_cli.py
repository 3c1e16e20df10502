"""`evofuse merge CONFIG OUT` (search/merge.py): outputs, streaming shards, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from search.merge import MergeConfigError, OutputBuffers, run_merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from search.models.tiny import byte_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("cli_models")
    tokenizer = byte_tokenizer()
    paths = {}
    for label, seed in (("base", None), ("a", 1), ("b", 2)):
        model = tiny_llama(seed=0)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[label] = root / label
        model.save_pretrained(paths[label])
        tokenizer.save_pretrained(paths[label])
    return paths


def _write(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def _ties(models) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(models["b"]), "parameters": {"weight": 0.4, "density": 0.5}}],
        "dtype": "float32",
    }


def test_merge_writes_a_loadable_model_with_its_config(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _write(tmp_path, _ties(models))
    out = run_merge(config, tmp_path / "out", quiet=True)
    files = sorted(p.name for p in out.iterdir())
    assert "model-00001-of-00001.safetensors" in files and "model.safetensors.index.json" in files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml"} <= set(files)
    assert not [f for f in files if f.endswith(".partial")]
    assert (out / "mergekit_config.yml").read_text() == config.read_text()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base_state = load_file(str(models["base"] / "model.safetensors"))
    merged_state = merged.state_dict()
    assert set(merged_state) == set(base_state)
    assert all(torch.isfinite(t).all() for t in merged_state.values())
    assert any(not torch.equal(merged_state[n], base_state[n]) for n in base_state)
    tokens = AutoTokenizer.from_pretrained(out)("hello")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([tokens])).logits).all()


def test_small_shards_and_index_give_the_same_weights(models, tmp_path):
    config = _write(tmp_path, _ties(models))
    whole = run_merge(config, tmp_path / "whole", quiet=True)
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "model.safetensors").write_bytes(b"stale")  # an earlier run's weights
    sharded = run_merge(config, tmp_path / "sharded", quiet=True, max_shard_bytes=100_000)
    assert not (sharded / "model.safetensors").exists()
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    state = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:  # the reference reader accepts our files
            for name in handle.keys():
                assert index["weight_map"][name] == shard.name
                state[name] = handle.get_tensor(name)
    reference = load_file(str(whole / "model-00001-of-00001.safetensors"))
    assert set(state) == set(reference) and all(torch.equal(state[n], reference[n]) for n in state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_out_dtype_and_relative_paths(models, tmp_path, monkeypatch):
    config = _ties(models)
    config["out_dtype"] = "bfloat16"
    config["base_model"] = "base"  # relative to the config's directory
    path = models["base"].parent / "rel.yml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    out = run_merge(path, tmp_path / "bf16", quiet=True)
    state = load_file(str(out / "model-00001-of-00001.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(merge_method="ram"), "field 'merge_method': unknown merge method 'ram'; valid: linear"),
    (lambda c: c.update(slices=[]), "field 'slices': at least one entry is needed"),
    (lambda c: c.update(merge_method="passthrough"), "field 'models': op 'passthrough' takes 1 inputs"),
    (lambda c: c.pop("base_model"), "needs recipe field 'base'"),
    (lambda c: c["models"][0]["parameters"].pop("weight"), "needs parameter 'weight'"),
    (lambda c: c["models"][0]["parameters"].update(wieght=1), "unknown parameter 'wieght' for op 'ties'"),
    (lambda c: c.update(dtype="float8"), "field 'dtype'"),
    (lambda c: c["models"][1].update(model="/nonexistent/model"), "field 'models.1.model': /nonexistent/model"),
    (lambda c: c.update(tokenizer_source="union", tokenizer={"source": "base"}), "give either 'tokenizer_source' or 'tokenizer'"),
    (lambda c: c["models"].append(dict(c["models"][0])), "is listed twice"),
])
def test_bad_configs_raise_one_line_naming_the_field(models, tmp_path, mutate, message):
    config = _ties(models)
    mutate(config)
    with pytest.raises(MergeConfigError) as info:
        run_merge(_write(tmp_path, config), tmp_path / "out", quiet=True)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mismatched_tensors_and_pickles_are_refused(models, tmp_path):
    from search.models.tiny import tiny_llama

    odd = tmp_path / "odd"
    tiny_llama(seed=0, intermediate_size=96).save_pretrained(odd)
    config = _ties(models)
    config["models"][1]["model"] = str(odd)
    with pytest.raises(MergeConfigError, match="mlp.down_proj.weight' has shape"):
        run_merge(_write(tmp_path, config), tmp_path / "out", quiet=True)

    pickled = tmp_path / "pickled"  # the same weights as "b", as a .bin pickle
    pickled.mkdir()
    (pickled / "config.json").write_bytes((models["b"] / "config.json").read_bytes())
    torch.save(load_file(str(models["b"] / "model.safetensors")), pickled / "pytorch_model.bin")
    config["models"][1]["model"] = str(pickled)
    path = _write(tmp_path, config)
    with pytest.raises(MergeConfigError, match="pickle"):
        run_merge(path, tmp_path / "out", quiet=True)
    allowed = run_merge(path, tmp_path / "allowed", quiet=True, allow_pickle=True)
    (tmp_path / "ref").mkdir()
    reference = run_merge(_write(tmp_path / "ref", _ties(models)), tmp_path / "reference", quiet=True)
    ours = load_file(str(allowed / "model-00001-of-00001.safetensors"))
    theirs = load_file(str(reference / "model-00001-of-00001.safetensors"))
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_command_line_exit_code_on_bad_input(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: []\n")
    done = subprocess.run([sys.executable, "-m", "search.merge", str(bad), str(tmp_path / "out2")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "field 'models'" in done.stderr


def test_the_executable_exits_at_once_after_merge_with_its_code_and_output(models, tmp_path):
    """`evofuse merge` skips the interpreter's teardown (search.cli.console): the exit code,
    stderr's line and the merged files are all there."""
    config = _write(tmp_path, _ties(models))
    done = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(config), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    run_merge(config, tmp_path / "in_process", quiet=True)
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").read_bytes() == \
        (tmp_path / "in_process" / "model-00001-of-00001.safetensors").read_bytes()
    bad = _write(tmp_path, "merge_method: ties\nmodels: []\n")
    done = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(bad), str(tmp_path / "out2")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("evofuse merge: ") and "field 'models'" in done.stderr


# --- search/models/tensors.py: the streaming writer and the same-tensors check --------------


def _specs_and_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.empty": torch.empty(0, 4),
    }
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], tensors


def test_streaming_writer_writes_one_loadable_file_and_its_sha256(tmp_path):
    import hashlib

    from search.models.tensors import write_safetensors_streaming

    specs, tensors = _specs_and_tensors()
    asked = []

    def produce(name):
        asked.append(name)
        return tensors[name].clone()

    path = tmp_path / "w.safetensors"
    digest = write_safetensors_streaming(path, specs, produce)
    assert asked == [s[0] for s in specs]  # once each, in spec order
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    assert all(loaded[n].dtype == t.dtype and torch.equal(loaded[n], t) for n, t in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_streaming_in_safetensors_order_gives_the_bytes_of_safetensors_save(tmp_path):
    from safetensors.torch import save

    from search.models.tensors import safetensors_order, write_safetensors_streaming

    specs, tensors = _specs_and_tensors()
    tensors.update({"g.i8": torch.tensor([-1, 2], dtype=torch.int8), "h.u8": torch.tensor([3], dtype=torch.uint8),
                    "i.i16": torch.tensor([7], dtype=torch.int16), "j.f16": torch.tensor([0.5], dtype=torch.float16),
                    "k.i32": torch.tensor([9], dtype=torch.int32), "A.upper": torch.ones(2)})
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    path = tmp_path / "w.safetensors"
    write_safetensors_streaming(path, safetensors_order(specs), lambda name: tensors[name])
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})


def test_streaming_writer_leaves_nothing_when_produce_fails(tmp_path):
    from search.models.tensors import write_safetensors_streaming

    specs, tensors = _specs_and_tensors()

    def failing(name):
        if name == "c.ids":
            raise RuntimeError("offspring failed")
        return tensors[name]

    with pytest.raises(RuntimeError, match="offspring failed"):
        write_safetensors_streaming(tmp_path / "w.safetensors", specs, failing)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.safetensors"  # an existing file keeps its bytes
    old.write_bytes(b"previous")
    with pytest.raises(ValueError, match="the header says"):  # a tensor that does not match its spec
        write_safetensors_streaming(old, specs, lambda name: tensors[name].double())
    assert [p.name for p in tmp_path.iterdir()] == ["old.safetensors"] and old.read_bytes() == b"previous"


def test_mapped_views_read_every_dtype_misaligned_and_released_tensors_alike(tmp_path):
    from search.models.tensors import SafetensorsSource, TensorFileError, write_safetensors_streaming

    specs, tensors = _specs_and_tensors()
    tensors["0.four"] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # first: a.weight .. c.ids stay aligned,
    specs = [("0.four", torch.uint8, (4,))] + specs                      # e.scalar (float64) does not
    path = tmp_path / "model.safetensors"
    write_safetensors_streaming(path, specs, lambda name: tensors[name])
    before = path.read_bytes()
    source = SafetensorsSource(tmp_path)
    assert source.tensors["a.weight"].start % 4 == 0 and source.tensors["e.scalar"].start % 8 != 0
    views = {name: source.view(name) for name in tensors}
    for name, tensor in tensors.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor), name
    views["a.weight"].add_(1)  # a stray in-place write stays private: the file keeps its bytes
    for name in tensors:
        source.release(name)
    assert torch.equal(views["b.bf16"], tensors["b.bf16"])  # released pages read back from the file
    assert torch.equal(views["a.weight"], tensors["a.weight"])  # ... the private write included
    assert path.read_bytes() == before
    source.close()
    for cut in ("a.weight", "e.scalar"):  # mapped, read
        path.write_bytes(before[: source.tensors[cut].start + 4])  # the file ends inside the tensor
        with pytest.raises(TensorFileError, match=f"truncated while reading tensor '{cut}'"):
            SafetensorsSource(tmp_path).view(cut)


def test_same_tensors_check_names_the_model_and_the_tensor():
    from search.models.tensors import TensorFileError, check_same_tensors

    base = {"w": ((64, 128), "F32"), "n": ((64,), "F32")}
    assert check_same_tensors({"base": base, "b": dict(base)}) == ["n", "w"]
    cases = [
        ({"w": ((64, 96), "F32"), "n": ((64,), "F32")}, "parents.b: tensor w has shape [64, 96], base has [64, 128]"),
        ({"w": ((64, 128), "F32")}, "parents.b: tensor n is missing (present in base)"),
        ({**base, "x": ((1,), "F32")}, "parents.b: tensor x is not in base"),
    ]
    for other, message in cases:
        with pytest.raises(TensorFileError) as info:
            check_same_tensors({"base": base, "b": other})
        assert str(info.value) == message
    with pytest.raises(MergeConfigError, match=r"^/models/b: tensor 'w' has shape \[64, 96\], /models/base has"):
        check_same_tensors({"/models/base": base, "/models/b": cases[0][0]}, "", quote=True, error=MergeConfigError)


def test_sliced_config_rebuilds_depth_and_per_layer_lists():
    from evolve.recipe import RecipeError
    from evolve.slices import OutputSlice, SliceSource, layered_config

    a = {"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding"], "hidden_size": 64}
    b = {"num_hidden_layers": 4, "layer_types": ["b0", "b1", "b2", "b3"], "hidden_size": 64}
    slices = [OutputSlice((SliceSource("a", 0, 3),)), OutputSlice((SliceSource("b", 1, 4),))]
    out = layered_config(a, {"a": a, "b": b}, slices)
    assert out["num_hidden_layers"] == 6 and out["hidden_size"] == 64
    assert out["layer_types"] == ["full", "sliding", "full", "b1", "b2", "b3"]
    with pytest.raises(RecipeError, match="per-layer field 'layer_types'"):
        layered_config(a, {"a": a, "b": {"layer_types": ["x"]}}, slices)


def _merge_trace(models, tmp_path, monkeypatch, lookahead: int, slow: str | None = None):
    """Merge `_ties(models)` with LOOKAHEAD_BYTES = lookahead, recording in order each merge's
    start ("merge", name), each tensor the writer asks for ("ask", name: it has written the one
    before) and each tensor handed to it ("write", name); the merge of `slow` takes a tenth of a
    second longer."""
    import threading
    import time

    import search.merge as merge_module

    events, lock = [], threading.Lock()
    materialize, write = merge_module.materialize_tensor, merge_module.write_sharded_streaming

    def traced_materialize(recipe, name, loaded, **kwargs):
        with lock:
            events.append(("merge", name))
        if name == slow:
            time.sleep(0.1)
        return materialize(recipe, name, loaded, **kwargs)

    def traced_write(out, plan, produce, max_shard_bytes):
        def traced_produce(name):
            with lock:
                events.append(("ask", name))
            tensor = produce(name)
            with lock:
                events.append(("write", name))
            return tensor
        return write(out, plan, traced_produce, max_shard_bytes)

    monkeypatch.setattr(merge_module, "materialize_tensor", traced_materialize)
    monkeypatch.setattr(merge_module, "write_sharded_streaming", traced_write)
    monkeypatch.setattr(merge_module, "LOOKAHEAD_BYTES", lookahead)
    out = run_merge(_write(tmp_path, _ties(models)), tmp_path / f"out-{lookahead}", quiet=True)
    return out, events


def _merges_and_writes(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [event for event in events if event[0] != "ask"]


def test_merges_run_ahead_of_the_writer_within_the_budget(models, tmp_path, monkeypatch):
    """A slow first tensor does not stall the others (they are merged while it is), the
    merged-but-unwritten bytes beyond the tensor being written stay within W tensors plus
    LOOKAHEAD_BYTES, and the output is the same bytes as without look-ahead."""
    from search.merge import MERGE_WORKERS

    sizes = {name: t.numel() * t.element_size() for name, t in load_file(next(models["a"].glob("*.safetensors"))).items()}
    _, order = _merge_trace(models, tmp_path, monkeypatch, 0)
    first = next(name for kind, name in order if kind == "write")  # the first tensor of the file
    budget = 3 * max(sizes.values())
    ahead_out, ahead = _merge_trace(models, tmp_path, monkeypatch, budget, slow=first)
    plain_out, plain = _merge_trace(models, tmp_path, monkeypatch, 0, slow=first)
    # Merges started before the first tensor reached the writer: without look-ahead W, and the
    # one that handing it over lets start (its "merge" may be recorded before its "write").
    assert _merges_and_writes(ahead).index(("write", first)) > MERGE_WORKERS + 1, "the other thread went on while the first was slow"
    assert _merges_and_writes(plain).index(("write", first)) <= MERGE_WORKERS + 1, "without look-ahead, W tensors at most"
    # A tensor counts as written once the writer asks for the next one: "write" is recorded
    # after `produce` returns, and `produce` has already let further merges start by then.
    # The budget is over file positions: the waiting tensors are taken in file order, not in the
    # order their merges happened to start (two merge threads may start q + 1 before q).
    position = {name: i for i, name in enumerate(name for kind, name in order if kind == "write")}
    written: set[str] = set()
    started: list[str] = []
    asked: list[str] = []
    for kind, name in ahead:
        if kind == "merge":
            started.append(name)
        elif kind == "ask":
            written.update(asked[-1:])
            asked.append(name)
        waiting = sorted((n for n in started if n not in written), key=position.get)  # the one being written first
        assert sum(sizes[n] for n in waiting[1 + MERGE_WORKERS:]) <= budget, waiting
    for shard in ahead_out.glob("*.safetensors"):
        assert shard.read_bytes() == (plain_out / shard.name).read_bytes()


def test_output_buffers_are_reused_only_when_they_made_them():
    buffers = OutputBuffers()
    made = buffers.take(torch.float32, (4, 3))
    buffers.give(made)
    assert buffers.take(torch.float32, (4, 3)) is made  # written: given out again, no new pages
    assert buffers.take(torch.float32, (4, 3)) is not made  # in use: a new one
    view_of_an_input = torch.zeros(4, 3)
    buffers.give(view_of_an_input)  # a method's own result, or an input's view: never written into
    assert buffers.take(torch.float32, (4, 3)) is not view_of_an_input
    buffers.give(made.view(3, 4))  # a view of a buffer is not the buffer: never given out twice
    assert buffers.take(torch.float32, (3, 4)) is not made
    buffers.give(made)
    assert buffers.take(torch.float16, (4, 3)) is not made and buffers.take(torch.float32, (3, 4)) is not made
