"""The native TIES kernel (evolve/ties_kernel.c) gives the torch path's bits, and falls back cleanly."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from evolve import native
from evolve.merge_methods import magnitude_cut, task_vector_merge

HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.int32)


def tied_inputs(count: int, experts: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes whose task vectors are rounded to 0.01: many equal magnitudes, so the
    k-th largest is usually shared and which tied entries stay matters."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=generator)
    deltas = [(torch.randn(count, generator=generator) * 0.03).round(decimals=2) for _ in range(experts)]
    return base, [base + delta for delta in deltas]


def torch_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "library", lambda: None)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the torch path is the only one")
def test_kernel_builds_where_a_compiler_is():
    assert native.library() is not None
    assert native.build().is_file()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("count", [1, 7, 1023, 1025, 70_001, 300_017])
@pytest.mark.parametrize("case", [
    dict(weights=[0.4, 0.3, 0.3], densities=[0.5, 0.5, 0.5], normalize=True),
    dict(weights=[1.0, -0.5, 0.7], densities=[0.2, 1.0, 0.0], normalize=False, scale=0.75),
    dict(weights=[0.3, 0.3, 0.3, 0.3, 0.3], densities=[0.9, 0.1, 0.5, 0.33, 0.66], normalize=True),
    dict(weights=[2.0], densities=[0.4], normalize=True),
    dict(weights=[0.5, 0.5], densities=[1.0, 1.0], normalize=True),
])
def test_ties_kernel_equals_the_torch_path_bit_for_bit(monkeypatch, count, case):
    base, xs = tied_inputs(count, len(case["weights"]), seed=count)
    kwargs = dict(densities=case["densities"], sparsify="magnitude", consensus=True,
                  normalize=case["normalize"], scale=case.get("scale", 1.0))
    fused = task_vector_merge(base, xs, case["weights"], **kwargs)
    with monkeypatch.context() as patch:
        torch_path(patch)
        reference = task_vector_merge(base, xs, case["weights"], **kwargs)
    assert torch.equal(bits(fused), bits(reference))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_kernel_is_used_for_float32_ties_only(monkeypatch):
    calls = []
    original = native.ties_merge
    monkeypatch.setattr(native, "ties_merge", lambda *a, **k: calls.append(1) or original(*a, **k))
    base, xs = tied_inputs(5000, 2, seed=1)
    task_vector_merge(base, xs, [0.5, 0.5], densities=[0.5, 0.5], sparsify="magnitude", consensus=True)
    assert calls == [1]
    task_vector_merge(base, xs, [0.5, 0.5], densities=[0.5, 0.5], sparsify="magnitude", consensus=False)
    task_vector_merge(base.double(), [x.double() for x in xs], [0.5, 0.5], densities=[0.5, 0.5],
                      sparsify="magnitude", consensus=True)
    task_vector_merge(base, xs, [0.5, 0.5], densities=[0.5, 0.5], sparsify="random", consensus=True, seeds=[1, 2])
    assert calls == [1]  # task arithmetic, float64 and DARE keep the torch path


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
@pytest.mark.parametrize("density", [0.01, 0.5, 0.97])
def test_magnitude_cut_bracket_pass_equals_numpy(monkeypatch, density):
    base, (x,) = tied_inputs(200_003, 1, seed=7)
    fused = magnitude_cut(x, base, density)
    with monkeypatch.context() as patch:
        torch_path(patch)
        reference = magnitude_cut(x, base, density)
    assert (fused.threshold, fused.ties) == (reference.threshold, reference.ties)
    kept = int(((x - base).abs() > fused.threshold).sum()) + fused.ties
    assert kept == max(1, int(density * x.numel()))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_bracket_overflow_returns_none_and_the_cut_stays_exact():
    # every magnitude equal: the whole tensor lies in the bracket, far past its room
    base = torch.zeros(100_000)
    x = torch.full((100_000,), 0.25)
    x[::2] = -0.25
    assert native.magnitude_bracket(x.numpy(), base.numpy(), 0.2, 0.3, capacity=1000) is None
    above, inside = native.magnitude_bracket(x.numpy(), base.numpy(), 0.2, 0.3, capacity=100_000)
    assert above == 0 and inside.shape == (100_000,) and np.all(inside == 0.25)
    cut = magnitude_cut(x, base, 0.3)
    assert (cut.threshold, cut.ties) == (0.25, 30_000)


def test_without_a_compiler_the_merge_takes_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOFUSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.library() is None
    assert not native.available(torch.zeros(3))
    base, xs = tied_inputs(4096, 3, seed=3)
    merged = task_vector_merge(base, xs, [0.4, 0.3, 0.3], densities=[0.5] * 3, sparsify="magnitude", consensus=True)
    assert torch.isfinite(merged).all()
    monkeypatch.setenv("EVOFUSE_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOFUSE_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path / "kernels" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # built once
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial files left
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
    assert native.build() != first  # -march=native code is not shared across CPUs
