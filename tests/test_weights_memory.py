"""The driver's weights lifecycle streams: a kept member is replayed tensor by tensor into its
safetensors file (the bytes and sha256 of the old whole-dict `safetensors.torch.save`) and
published from that file, so the driver never holds a whole model of its own.

No Ray here: the object store is stood in for by the same `SharedState`s (numpy arrays in the
weights' own dtype) that `put_weights` would put (`ray.get` returns them as they are).
"""
from __future__ import annotations

import hashlib
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from evolve.materialize import materialize
from evolve.recipe import Recipe
from search.models.memory import release_freed_heap
from search.run import weights as weights_module
from search.run.store import RunStore
from search.run.weights import WeightBank
from search.run.workers import from_numpy_state, to_numpy_state

RECIPES = [
    Recipe(op="evolver", inputs=("a", "b"), params={"F": 0.5, "CR": 0.5}, seed=3),
    Recipe(op="de_rand_1", inputs=("a", "b", "c", "base"), params={"F": 0.7, "CR": 0.3}, seed=4),
    Recipe(op="linear", inputs=("a", "b", "c"), params={"weight": 1.0}, seed=5),
    Recipe(op="ties", inputs=("a", "b"), params={"weight": 1.0, "density": 0.5}, seed=6, base="base"),
    Recipe(op="dare_ties", inputs=("a", "c"), params={"weight": 1.0, "density": 0.3}, seed=7, base="base"),
]


def model_state(seed: int, layers: int = 3, width: int = 16) -> dict[str, torch.Tensor]:
    """A small Llama-like state dict (names sorted differently from safetensors' file order)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(50, width, generator=gen)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = torch.randn(width, width, generator=gen)
        state[p + "mlp.up_proj.weight"] = torch.randn(2 * width, width, generator=gen)
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(width, generator=gen)
    state["model.norm.weight"] = torch.ones(width)
    state["lm_head.weight"] = torch.randn(50, width, generator=gen)
    return state


class FakeRay:
    """`ray.get` over the stand-in object store: the published dict itself."""

    @staticmethod
    def get(ref):
        return ref


@pytest.fixture
def bank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    monkeypatch.setattr(weights_module, "put_weights", to_numpy_state)  # what ray.put stores
    base = model_state(0)
    names = sorted(base)
    bank = WeightBank(RunStore(tmp_path / "run"), names, exclude=["*layernorm*"])
    gen = torch.Generator().manual_seed(1)
    for i, wid in enumerate(("base", "a", "b", "c")):
        noisy = {k: v + 0.05 * i * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        bank.refs[wid] = to_numpy_state(noisy)
    return bank


def whole_dict_keep(bank: WeightBank, recipe: Recipe) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The path before streaming: the whole replayed dict, then `safetensors.torch.save` bytes."""
    from safetensors.torch import save

    inputs = {wid: from_numpy_state(bank.refs[wid]) for wid in recipe.input_ids()}
    weights = materialize(recipe, inputs, bank.names, bank.exclude)
    data = save({k: v.detach().contiguous().cpu() for k, v in weights.items()}, metadata={"format": "pt"})
    return data, weights


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.op for r in RECIPES])
def test_streaming_keep_writes_the_whole_dict_bytes(bank, recipe):
    expected, weights = whole_dict_keep(bank, recipe)
    checksum = bank.keep(recipe, "g000-001")
    path = bank.store.weights_path("g000-001")
    assert path.read_bytes() == expected
    assert checksum == hashlib.sha256(expected).hexdigest()
    published = bank.refs["g000-001"]
    assert set(published.arrays) == set(weights) and not published.bfloat16
    for name, tensor in weights.items():  # what offspring read equals what was replayed
        array = published.arrays[name]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32
        assert torch.equal(torch.from_numpy(np.array(array)), tensor), name
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_keep_all_replays_side_by_side_with_the_bytes_of_one_at_a_time(bank, tmp_path, monkeypatch):
    recipes = {f"g001-{i:03d}": recipe for i, recipe in enumerate(RECIPES)}
    threads = set()
    replay = WeightBank.replay

    def noting_thread(self, recipe, member_id):
        threads.add(threading.current_thread().name)
        return replay(self, recipe, member_id)

    monkeypatch.setattr(WeightBank, "replay", noting_thread)
    bank.replay_threads = 2
    checksums = bank.keep_all(recipes)
    assert list(checksums) == list(recipes)  # in the members' order
    assert threads and all(name.startswith("keep") for name in threads)  # replayed in the pool
    for member_id, recipe in recipes.items():
        expected, _ = whole_dict_keep(bank, recipe)
        assert bank.store.weights_path(member_id).read_bytes() == expected
        assert checksums[member_id] == hashlib.sha256(expected).hexdigest()
        assert member_id in bank.refs
    # keep_new skips parents, stored members and copies, and adds only the new ones
    stored = dict(checksums)
    members = [{"id": "base", "recipe": Recipe(op="copy", inputs=("base",)).to_dict()},
               {"id": "g001-000", "recipe": RECIPES[0].to_dict()},
               {"id": "g002-000", "recipe": RECIPES[1].to_dict()}]
    bank.parent_dirs = {"base": tmp_path}
    bank.keep_new(members, stored)
    assert set(stored) - set(checksums) == {"g002-000"} and stored["g001-000"] == checksums["g001-000"]


@pytest.mark.parametrize("threads", [1, 2])
def test_replaced_members_leave_the_store_before_their_replacements_enter_it(bank, tmp_path, monkeypatch, threads):
    """A merge generation: offspring of `a` and `b` replace them. Both replay first (each reads
    both), then `a` and `b` are released, then the new members are published: the store holds
    five weight sets at most, not seven."""
    recipes = {"g001-000": RECIPES[0], "g001-001": RECIPES[1]}
    expected = {member_id: whole_dict_keep(bank, recipe)[0] for member_id, recipe in recipes.items()}
    held_at_put = []

    def put(state):
        held_at_put.append(set(bank.refs))
        return to_numpy_state(state)

    monkeypatch.setattr(weights_module, "put_weights", put)
    bank.parent_dirs, bank.replay_threads = {"base": tmp_path}, threads
    checksums = bank.keep_all(recipes, live={"g001-000", "g001-001", "c"})
    assert held_at_put == [{"base", "c"}, {"base", "c", "g001-000"}]
    assert set(bank.refs) == {"base", "c", "g001-000", "g001-001"}
    for member_id, data in expected.items():
        assert bank.store.weights_path(member_id).read_bytes() == data
        assert checksums[member_id] == hashlib.sha256(data).hexdigest()
    # without `live` (a joint run's front may read the old population) nothing is released
    bank.keep_all({"g002-000": Recipe(op="evolver", inputs=("c", "g001-000"), params={"F": 0.5, "CR": 0.5}, seed=8)})
    assert set(bank.refs) == {"base", "c", "g001-000", "g001-001", "g002-000"}


def test_keep_all_raises_the_failing_replay_and_leaves_no_file_of_it(bank, monkeypatch):
    def broken(recipe, inputs, names, exclude, out=None):
        if recipe.seed == RECIPES[1].seed and names == [bank.names[2]]:
            raise RuntimeError("boom")
        return materialize(recipe, inputs, names, exclude, out=out)

    monkeypatch.setattr(weights_module, "materialize", broken)
    with pytest.raises(RuntimeError, match="boom"):
        bank.keep_all({"g001-000": RECIPES[0], "g001-001": RECIPES[1]})
    assert not bank.store.weights_path("g001-001").exists() and "g001-001" not in bank.refs


def test_save_weights_of_a_state_matches_safetensors_save(tmp_path):
    """Mixed dtypes (file order: by dtype, then name), a scalar, a non-contiguous tensor."""
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(0)
    state = {
        "z.weight": torch.randn(3, 5, generator=gen),
        "a.half": torch.randn(4, generator=gen).half(),
        "m.bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "b.ids": torch.arange(7),
        "c.mask": torch.tensor([True, False, True]),
        "s.scalar": torch.tensor(2.5),
        "t.transposed": torch.randn(5, 3, generator=gen).T,
        "d.float64": torch.randn(2, dtype=torch.float64, generator=gen),
    }
    expected = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    store = RunStore(tmp_path)
    checksum = store.save_weights("m", state)
    assert store.weights_path("m").read_bytes() == expected
    assert checksum == hashlib.sha256(expected).hexdigest()
    loaded = store.load_weights("m", checksum)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_failing_replay_leaves_no_file(bank, monkeypatch):
    def broken(recipe, inputs, names, exclude, out=None):
        if names == [bank.names[2]]:
            raise RuntimeError("boom")
        return materialize(recipe, inputs, names, exclude, out=out)

    monkeypatch.setattr(weights_module, "materialize", broken)
    with pytest.raises(RuntimeError, match="boom"):
        bank.keep(RECIPES[0], "g000-002")
    assert not bank.store.weights_dir.exists() or not any(bank.store.weights_dir.iterdir())
    assert "g000-002" not in bank.refs


def test_shared_state_keeps_each_dtype_at_its_own_size():
    """bfloat16 travels as its bit patterns (numpy has none) and comes back bit for bit; every
    other dtype as itself: the store holds a bfloat16 checkpoint at its own size."""
    gen = torch.Generator().manual_seed(0)
    state = {
        "w.bf16": torch.randn(8, 4, generator=gen).bfloat16(),
        "w.half": torch.randn(3, generator=gen).half(),
        "w.float": torch.randn(2, 5, generator=gen),
        "w.double": torch.randn(2, dtype=torch.float64, generator=gen),
        "b.ids": torch.arange(6),
    }
    shared = to_numpy_state(state)
    assert shared.bfloat16 == {"w.bf16"} and shared.arrays["w.bf16"].dtype == np.int16
    assert shared.nbytes() == sum(t.numel() * t.element_size() for t in state.values())
    back = from_numpy_state(shared)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def upcast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}


@pytest.mark.parametrize("recipe", RECIPES[:2], ids=[r.op for r in RECIPES[:2]])
def test_members_of_bfloat16_parents_keep_their_step_in_float32(bank, recipe):
    """Parents stay bfloat16 in the store; the replayed member is float32 and equals the replay
    from float32 copies of the same parents (the arithmetic ran in float32 either way). Written
    back in bfloat16 it would lose the step: a quarter or more of its entries (crossover keeps the
    rest as the member's own bfloat16 values) are not bfloat16 numbers."""
    for wid in list(bank.refs):
        bank.refs[wid] = to_numpy_state({k: v.bfloat16() for k, v in from_numpy_state(bank.refs[wid]).items()})
    checksum = bank.keep(recipe, "g000-001")
    stored = bank.store.load_weights("g000-001", checksum)
    upcast_inputs = {wid: upcast(from_numpy_state(bank.refs[wid])) for wid in recipe.input_ids()}
    expected = materialize(recipe, upcast_inputs, bank.names, bank.exclude)
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert all(torch.equal(stored[name], expected[name]) for name in bank.names)
    evolved = stored["model.layers.0.mlp.up_proj.weight"]
    assert (evolved != evolved.bfloat16().float()).float().mean() > 0.2
    # an actor materialises the same candidate from the same bfloat16 store into its float32 model
    working = {name: torch.zeros_like(t) for name, t in expected.items()}
    materialize(recipe, {wid: from_numpy_state(bank.refs[wid]) for wid in recipe.input_ids()}, bank.names,
                bank.exclude, out=working)
    assert all(torch.equal(working[name], stored[name]) for name in bank.names)


PUBLISH_AND_READ = """
import json, os, sys
from pathlib import Path

import ray, torch

from search.run.store import RunStore
from search.run.weights import WeightBank
from search.run.workers import from_numpy_state

parent = Path(sys.argv[1])
ray.init(include_dashboard=False, log_to_driver=False, **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 1}))
bank = WeightBank(RunStore(parent.parent / "run"), [], exclude=[])
bank.publish_parents({"base": parent})

@ray.remote
def read(refs):
    shared = ray.get(refs[0])
    sums = {name: t.to(torch.float64).sum().item() for name, t in from_numpy_state(shared).items()}
    dtypes = {name: str(t.dtype) for name, t in from_numpy_state(shared).items()}
    return {"writeable": any(a.flags.writeable for a in shared.arrays.values()), "nbytes": shared.nbytes(),
            "sums": sums, "dtypes": dtypes}

print(json.dumps(ray.get(read.remote([bank.refs["base"]]))))
ray.shutdown()
"""


@pytest.mark.slow
def test_bfloat16_parents_in_a_real_object_store_are_shared_at_their_own_size(tmp_path):
    """Through a real Ray object store (a fresh process joining the session's cluster): a bfloat16
    parent published from its model directory reaches another process as read-only (zero-copy)
    views of its own bfloat16 bytes."""
    import json
    import subprocess

    from search.models.sources import load_state
    from search.models.tiny import tiny_llama

    tiny_llama(seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "parent")
    state = load_state(tmp_path / "parent")
    proc = subprocess.run([sys.executable, "-c", PUBLISH_AND_READ, str(tmp_path / "parent")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not seen["writeable"] and seen["nbytes"] == sum(2 * t.numel() for t in state.values())
    assert seen["dtypes"] == {name: "torch.bfloat16" for name in state}
    assert seen["sums"] == {name: t.to(torch.float64).sum().item() for name, t in state.items()}


# ---- memory: the kernel's own peak-RSS counter (VmHWM), reset right before the replay ----------


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident set exceeded its resident set before `fn`."""
    release_freed_heap()  # else a later allocation reusing kept heap would not show in the resident set
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak(),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_replay_peak_memory_is_about_one_tensor_not_a_model(tmp_path, monkeypatch):
    """64 tensors of 1 MiB (a 64 MiB model): the streaming keep's peak stays within a few
    tensors (the output and the operator's temporaries: about 4.5 for Evolver), while the whole-dict path measured the same way needs about two models (the
    replayed dict plus the serialised bytes), which shows the probe sees a whole model."""
    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    published = {}
    monkeypatch.setattr(weights_module, "put_weights", lambda state: published.setdefault("m", state) and "ref")
    count, shape = 64, (512, 512)  # 1 MiB each in float32
    tensor_bytes = 4 * shape[0] * shape[1]
    model_bytes = count * tensor_bytes
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(count)]
    bank = WeightBank(RunStore(tmp_path / "run"), names, exclude=[])
    gen = torch.Generator().manual_seed(0)
    for wid in ("a", "b"):
        bank.refs[wid] = to_numpy_state({n: torch.randn(shape, generator=gen) for n in names})
    recipe = Recipe(op="evolver", inputs=("a", "b"), params={"F": 0.5, "CR": 0.5}, seed=1)

    bank.keep(recipe, "g000-000")  # warm-up: first-use imports and allocator pools are not the replay's
    published.clear()
    streaming = _peak_rss_growth(lambda: bank.keep(recipe, "g000-001"))
    published.clear()  # drop the memory-mapped published state before the control

    def whole_dict():
        data, weights = whole_dict_keep(bank, recipe)
        del data, weights

    control = _peak_rss_growth(whole_dict)
    assert control > 1.5 * model_bytes, f"the probe missed a whole-dict replay ({control / 2**20:.0f} MiB)"
    # a few tensors (the output and the operator's temporaries) plus a fixed allowance (page
    # faults of code and buffers touched once per call: 4-9 MiB here, more on a loaded machine):
    # far from the whole model the old path held (twice over)
    assert streaming < model_bytes / 3, (
        f"streaming keep peaked {streaming / 2**20:.1f} MiB above its start for a "
        f"{model_bytes / 2**20:.0f} MiB model of {tensor_bytes / 2**20:.0f} MiB tensors")
