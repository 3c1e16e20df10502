"""Parents on demand: resolve each configured parent to a model directory, fine-tuning experts.

A parent with a `finetune` section is trained from its source (a built-in, a directory, or an
earlier parent) on its data for a few steps and cached under `$EVOFUSE_CACHE/experts/<name>-<hash>`,
keyed by everything that determines its weights (`expert_key`, written beside the weights as
`evofuse_expert.json`):

- the source's weights: the sha256 of every file of its directory (weights, config, tokenizer),
  or the key of the earlier parent it is fine-tuned from — never a path or a modification time;
- the data's content (`datasets.data_fingerprint`: the training texts' sha256, the built-in
  generator version, the Python version for pydoc);
- every fine-tune setting, and `FINETUNE_VERSION` of the training code below;
- the versions of torch and transformers, whose kernels and initialisation change the numbers.

Edit the data file, swap the base weights or upgrade torch, and the expert is built again; a
cache entry is never reused for other inputs. File hashes are remembered per (path, size,
mtime, ctime, inode) in `$EVOFUSE_CACHE/file-hashes.json`: a large base is read once, not
every run.

Training uses LoRA on every projection of every block (merged back into the weights
afterwards, so the expert is a plain model of the base's architecture), or trains all weight
matrices when `lora_rank` is 0. The build prints its progress even under `--quiet`
(`search.models.progress`): one line with its ETA after the first two steps, one at the end.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from compression.calibration import token_stream

from search.config import FineTune, ParentSpec, RunConfig
from search.models.datasets import data_fingerprint, training_texts
from search.models.memory import release_freed_heap
from search.models.progress import SetupStep
from search.models.sources import SourceError, build_cached, cache_root, file_lock, load_model, resolve_source

FINETUNE_VERSION = 1  # raise when `finetune` changes the weights it makes for the same inputs

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
    with SetupStep(f"fine-tune {label}".strip(), total=spec.steps, quiet=quiet) as progress:
        for step in range(spec.steps):
            idx = order[(torch.arange(spec.batch_size) + step * spec.batch_size) % len(windows)]
            batch = windows[idx]  # (B, T)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.update(loss=f"{loss.item():.3f}")
    model.eval()
    if spec.lora_rank > 0:
        _swap_linears(model, lambda lin: lin.merged() if isinstance(lin, LoRALinear) else lin)
        model.requires_grad_(True)
    # The driver fine-tunes before it searches: hand the freed activations (and optimizer state)
    # back to the OS, which glibc's malloc would otherwise keep for the rest of the run (+0.65
    # GiB on SmolLM2-135M, +2.1 GiB on a 3x model; benchmarks/results/search_memory.md).
    del opt, sched, params, loss, batch
    release_freed_heap()
    return model


# --------------------------------------------------------------------------- the cache key

SKIPPED_FILES = ("README.md", "evofuse_expert.json")  # model cards and our own key: not weights


def _file_sha256(path: Path, memo: dict) -> str:
    stat = path.stat()
    seen = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]  # ctime: any write, even `cp -p`
    known = memo.get(str(path))
    if known and known[:-1] == seen:
        return known[-1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    memo[str(path)] = [*seen, digest.hexdigest()]
    return digest.hexdigest()


def directory_fingerprint(path: Path) -> str:
    """sha256 over the name and content hash of every file of a model directory (weights,
    config, tokenizer; not a model card), remembering each file's hash per (size, mtime, ctime, inode)."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and f.name not in SKIPPED_FILES)
    memo_path = cache_root() / "file-hashes.json"
    with file_lock(cache_root() / ".file-hashes.lock"):
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        before = dict(memo)
        hashes = [[f.name, _file_sha256(f, memo)] for f in files]
        if memo != before:
            memo = {name: entry for name, entry in memo.items() if Path(name).is_file()}  # forget deleted files
            tmp = memo_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_path)
    return hashlib.sha256(json.dumps(hashes).encode()).hexdigest()


def expert_key(source_identity: str, spec: FineTune) -> dict:
    """Everything that determines a fine-tuned expert's weights (see the module docstring)."""
    import transformers

    return {
        "version": FINETUNE_VERSION,
        "source": source_identity,
        "data": data_fingerprint(spec.data),
        "finetune": spec.model_dump(mode="json", exclude={"data"}),  # the data is its content above
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def resolve_parents(config: RunConfig, quiet: bool = False) -> dict[str, Path]:
    """{parent name: model directory}, fine-tuning (once, cached) the parents that ask for it."""
    dirs: dict[str, Path] = {}
    identities: dict[str, str] = {}  # parent name -> the key of its weights (fine-tuned parents)
    for parent in config.parents.all():
        dirs[parent.name], identity = _resolve_one(parent, dirs, identities, quiet)
        if identity is not None:
            identities[parent.name] = identity
    return dirs


def _resolve_one(parent: ParentSpec, dirs: dict[str, Path], identities: dict[str, str], quiet: bool):
    """(model directory, the expert's key digest or None for a parent used as it is)."""
    earlier = parent.source in dirs
    source = str(dirs[parent.source]) if earlier else parent.source
    if parent.finetune is None:
        return resolve_source(source), None
    if earlier and parent.source in identities:
        identity = identities[parent.source]
    else:  # a built-in, a directory, or an earlier parent used as it is: its files
        identity = directory_fingerprint(resolve_source(source))
    key = expert_key(identity, parent.finetune)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        model, tokenizer = load_model(source)
        finetune(model, tokenizer, parent.finetune, label=f"expert {parent.name}", quiet=quiet)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "evofuse_expert.json").write_text(json.dumps(key, indent=1, sort_keys=True))

    return build_cached(f"experts/{parent.name}-{digest}", build), digest
