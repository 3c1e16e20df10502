"""Parents on demand: resolve each configured parent to a model directory, fine-tuning experts.

A parent with a `finetune` section is trained from its source (a built-in, a directory, or an
earlier parent) on its data for a few steps and cached under `$EVOFUSE_CACHE/experts/<hash>`,
keyed by everything that determines its weights. Training uses LoRA on every projection of
every block (merged back into the weights afterwards, so the expert is a plain model of the
base's architecture), or trains all weight matrices when `lora_rank` is 0.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compression.calibration import token_stream

from search.config import FineTune, ParentSpec, RunConfig
from search.models.datasets import training_texts
from search.models.sources import BUILTINS, SourceError, build_cached, load_model, resolve_source, safetensors_files

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B (A x), with B zero-initialised so training starts at W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T @ self.lora_b.T)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b @ self.lora_a)  # (out, in)
        return self.base


def _swap_linears(model: nn.Module, make) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in LORA_TARGETS and isinstance(child, (nn.Linear, LoRALinear)):
                setattr(parent, name, make(child))


def training_windows(tokenizer, data: str, seq_len: int) -> torch.Tensor:
    ids = token_stream(tokenizer, training_texts(data))
    n = len(ids) // seq_len
    if n == 0:
        raise SourceError(f"{data}: too little text for one training window of {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (N, T)


def finetune(model: nn.Module, tokenizer, spec: FineTune, label: str = "", quiet: bool = False) -> nn.Module:
    """Train `model` for spec.steps AdamW steps (cosine decay) on windows of spec.data."""
    torch.manual_seed(spec.seed)
    windows = training_windows(tokenizer, spec.data, spec.seq_len)
    if spec.lora_rank > 0:
        model.requires_grad_(False)
        _swap_linears(model, lambda lin: LoRALinear(lin, spec.lora_rank, spec.lora_alpha))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(windows), generator=gen)
    model.train()
    bar = tqdm(range(spec.steps), desc=f"fine-tune {label}", disable=quiet, leave=False)
    for step in bar:
        idx = order[(torch.arange(spec.batch_size) + step * spec.batch_size) % len(windows)]
        batch = windows[idx]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    if spec.lora_rank > 0:
        _swap_linears(model, lambda lin: lin.merged() if isinstance(lin, LoRALinear) else lin)
        model.requires_grad_(True)
    return model


def _source_identity(source: str, resolved: dict[str, str]) -> str:
    if source in resolved:
        return resolved[source]
    if source in BUILTINS:
        return source
    path = resolve_source(source)
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in safetensors_files(path)]
    return json.dumps([str(path.resolve()), files])


def resolve_parents(config: RunConfig, quiet: bool = False) -> dict[str, Path]:
    """{parent name: model directory}, fine-tuning (once, cached) the parents that ask for it."""
    dirs: dict[str, Path] = {}
    identities: dict[str, str] = {}
    for parent in config.parents.all():
        dirs[parent.name], identities[parent.name] = _resolve_one(parent, dirs, identities, quiet)
    return dirs


def _resolve_one(parent: ParentSpec, dirs: dict[str, Path], identities: dict[str, str], quiet: bool):
    source = str(dirs[parent.source]) if parent.source in dirs else parent.source
    identity = _source_identity(parent.source, identities)
    if parent.finetune is None:
        return resolve_source(source), identity
    key = json.dumps([identity, parent.finetune.model_dump(mode="json")], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        model, tokenizer = load_model(source)
        finetune(model, tokenizer, parent.finetune, label=parent.name, quiet=quiet)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "evofuse_expert.json").write_text(json.dumps({"source": identity, **json.loads(key)[1]}, indent=1))

    return build_cached(f"experts/{parent.name}-{digest}", build), digest
