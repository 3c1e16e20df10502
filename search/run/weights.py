"""The weights' lifecycle: which weight sets exist, where they live, when they are let go.

Parents' weights are put into the Ray object store once; an offspring that joins the population
(or the hall of fame / Pareto front) is replayed from its recipe on the driver, written to
`weights/<id>.safetensors` (its sha256 goes into the checkpoint) and published to the object
store for the offspring that will read it. A weight set nothing will read again is released
so the object store does not fill and spill to disk. Candidates of a compress run only re-plan
a parent's weights (a `copy` recipe) and store nothing.

Memory: the driver never holds a whole model of its own. Parents are read memory-mapped
(`load_state`) and copied straight into the object store; a replayed member is made one tensor
at a time from zero-copy views of its inputs in the object store and streamed into its
safetensors file (at most one output tensor alive per replay; the new members of a generation
are replayed side by side, one per core up to four), then published from that file, again
memory-mapped (page cache, not heap). Parents stay in their own dtype there; a member is
float32 at least (`member_dtype`). What a run needs per node is the object store (parents
once, plus the live members) and one working model per actor (`benchmarks/bench_search.py
--memory` measures it).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from evolve.materialize import materialize
from evolve.recipe import Recipe

from search.models.sources import load_state
from search.run.store import RunStore
from search.run.workers import from_numpy_state, put_weights


def member_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a replayed member is stored in: its first input's, at least float32. An evolved
    step is often smaller than a bfloat16 weight's rounding (2^-8 of it), so a member of
    half-precision parents written back in half precision would lose the step that made it."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


@dataclass
class WeightBank:
    store: RunStore
    names: list[str]  # tensor names that recipes produce
    exclude: list[str]  # tensor patterns never evolved
    parent_dirs: dict[str, Path] = field(default_factory=dict)
    refs: dict = field(default_factory=dict)  # weight-set id -> Ray object ref
    # Members replayed side by side: one per core, at most four (each replay holds one tensor,
    # and torch's element-wise ops in each already use the cores).
    replay_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def publish_parents(self, parent_dirs: dict[str, Path]) -> None:
        self.parent_dirs = dict(parent_dirs)
        for name, path in parent_dirs.items():  # memory-mapped, copied into the object store
            self.refs[name] = put_weights(load_state(path))

    def restore(self, checksums: dict[str, str]) -> None:
        """Publish the stored members of a checkpoint (verified against their sha256)."""
        for member_id, checksum in checksums.items():
            if member_id not in self.refs:
                self.refs[member_id] = put_weights(self.store.load_weights(member_id, checksum))

    def inputs_of(self, recipe: Recipe) -> dict:
        """{weight-set id: object ref} for everything a recipe reads."""
        return {wid: self.refs[wid] for wid in recipe.input_ids()}

    def keep(self, recipe: Recipe, member_id: str) -> str:
        """Replay a member on the driver (CPU, at least fp32), store and publish it; its sha256."""
        checksum = self.replay(recipe, member_id)
        self.publish(member_id)
        return checksum

    def replay(self, recipe: Recipe, member_id: str) -> str:
        """Replay a member into its safetensors file; its sha256.

        Tensor by tensor: each is materialised from the inputs' object-store views and written
        to the member's file before the next is made (the bytes are those of a whole-dict save)."""
        import ray

        inputs = {wid: from_numpy_state(ray.get(self.refs[wid])) for wid in recipe.input_ids()}
        first = inputs[recipe.inputs[0]]  # every output tensor has its shape

        def produce(name: str) -> torch.Tensor:  # one tensor, in the member's dtype (not the input's)
            out = {name: torch.empty(first[name].shape, dtype=member_dtype(first[name].dtype))}
            return materialize(recipe, inputs, [name], self.exclude, out=out)[name]

        specs = [(name, member_dtype(first[name].dtype), tuple(first[name].shape)) for name in self.names]
        return self.store.save_weights(member_id, specs=specs, produce=produce)

    def publish(self, member_id: str) -> None:
        """Put a stored member into the object store from its file, memory-mapped."""
        self.refs[member_id] = put_weights(self.store.load_weights(member_id))

    def keep_all(self, recipes: Mapping[str, Recipe], live: set[str] | None = None) -> dict[str, str]:
        """`keep` each {member id: recipe}; {member id: sha256} in the same order.

        The replays run side by side, `replay_threads` at a time (one per core, at most four): the
        actors wait for the new members between generations, so the node's cores are otherwise
        idle, and the work (torch's element-wise ops, sha256, file writes) releases the GIL. Each
        replay still holds one output tensor at a time. The new members are published once all
        are replayed; given `live`, the weight sets outside it (parents and the new members
        aside) are released first, so the store never holds the members being replaced and
        their replacements at once (the demo's twelve live models of 0.5 GiB, over Ray's default
        store on a 24 GiB machine, spilled to disk; now eight at most)."""
        if len(recipes) < 2 or self.replay_threads < 2:
            checksums = {member_id: self.replay(recipe, member_id) for member_id, recipe in recipes.items()}
        else:
            with ThreadPoolExecutor(max_workers=min(len(recipes), self.replay_threads), thread_name_prefix="keep") as pool:
                futures = {member_id: pool.submit(self.replay, recipe, member_id) for member_id, recipe in recipes.items()}
                checksums = {member_id: future.result() for member_id, future in futures.items()}
        if live is not None:
            self.release(live | set(recipes))
        for member_id in recipes:
            self.publish(member_id)
        return checksums

    def keep_new(self, members: Iterable, checksums: dict[str, str], live: set[str] | None = None) -> None:
        """Store members whose weights are new: not a parent's, not stored yet, not a copy (with
        `live`, release the rest first: `keep_all`)."""
        new = {}
        for member in members:
            recipe = Recipe.from_dict(member["recipe"])
            if member["id"] not in checksums and member["id"] not in self.parent_dirs and recipe.op != "copy":
                new[member["id"]] = recipe
        checksums.update(self.keep_all(new, live))

    def release(self, live: set[str]) -> None:
        """Let Ray free weight sets nothing will read again (parents always stay)."""
        self.refs = {k: v for k, v in self.refs.items() if k in live or k in self.parent_dirs}

    def recipe_for_test(self, member_id: str, recipe: Recipe) -> Recipe:
        """Read a member's stored weights when they are published; else replay its recipe (a
        compress candidate re-plans its parent's weights)."""
        return Recipe(op="copy", inputs=(member_id,)) if member_id in self.refs else recipe


__all__ = ["WeightBank"]
