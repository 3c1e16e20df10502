"""TTM from scratch: a small Llama trained on pydoc:train, dense MLPs vs TTM MLPs at several ranks.

Every variant gets the same seed, the same batches in the same order and the same token budget;
only the MLP linears (gate, up, down) differ. A "dense-small" variant (dense MLPs with a
narrower intermediate size, matching the parameter count of one TTM rank) asks whether the TTM
structure beats simply making the dense model smaller.

Tokenizer: the byte tokenizer of search/tiny.py (259 symbols). Why not SmolLM2's: pydoc:train is
~205 KB, i.e. ~205k byte tokens but only ~50k SmolLM2 tokens -- too few to train on -- and a
49152 x d embedding would hold most of the parameters of a model this size, so "fewer
parameters" would be decided by the embedding, not by the MLPs that TTM compresses. Perplexity is
therefore per byte (bits per byte = log2(ppl)).

Evaluation: non-overlapping `--seq-len`-token windows over the pydoc:test topics joined by EOS
(the tail shorter than one window is dropped), mean next-token NLL over all predicted tokens.

    .venv/bin/python benchmarks/bench_ttm_scratch.py --quick   # ~2 variants, a few minutes
    .venv/bin/python benchmarks/bench_ttm_scratch.py           # all variants
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.calibration import calibration_windows  # noqa: E402
from compression.ttm import TTMLinear, matching_linears, replace_module  # noqa: E402
from search.models.tiny import SPECIALS, byte_tokenizer  # noqa: E402
from benchmarks.common import window_perplexity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def model_config(hidden: int, intermediate: int, layers: int, heads: int, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(SPECIALS) + 256, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def build(config: LlamaConfig, rank: int | None, seed: int) -> LlamaForCausalLM:
    """Dense Llama, or the same with every MLP linear a TTMLinear of max rank `rank`
    (cores initialised so the implied dense weight has the dense init's std 0.02)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if rank is not None:
        for name, linear in matching_linears(model, "mlp"):
            layer = TTMLinear(linear.in_features, linear.out_features, rank=rank, bias=False,
                              init_std=config.initializer_range)
            replace_module(model, name, layer)
    return model


def count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    return total, mlp


def train(model, windows: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """AdamW (0.9, 0.95), linear warmup over 5% of steps then cosine to 10% of lr; batches in a
    seeded order, identical for every variant."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    losses = []
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(windows.shape[0], generator=gen)])
        batch, order = windows[order[:batch_size]], order[batch_size:]  # (b, T)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (b, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two variants, few steps, part of the test set")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ranks", type=int, nargs="*", default=None)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 by default: on a shared, oversubscribed CPU two threads ran ~10x slower")
    ap.add_argument("--stem", default=None, help="results file name (default ttm_scratch / ttm_scratch_quick)")
    ap.add_argument("--dense-small", type=int, default=None, help="intermediate size of the dense-small variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 400)
    ranks = args.ranks if args.ranks is not None else ([16] if args.quick else [32, 16, 24, 8])

    tok = byte_tokenizer()
    train_windows = calibration_windows(tok, "pydoc:train", seq_len=args.seq_len).input_ids  # (N, T)
    test_windows = calibration_windows(tok, "pydoc:test", seq_len=args.seq_len).input_ids
    if args.quick:
        test_windows = test_windows[:64]
    config = model_config(args.hidden, args.intermediate, args.layers, args.heads, args.seq_len)

    variants: list[tuple[str, LlamaConfig, int | None]] = [("dense", config, None)]
    variants += [(f"ttm-r{r}", config, r) for r in ranks]
    if args.dense_small:
        small = model_config(args.hidden, args.dense_small, args.layers, args.heads, args.seq_len)
        variants.insert(2, (f"dense-small-i{args.dense_small}", small, None))

    meta = dict(
        command="benchmarks/bench_ttm_scratch.py " + " ".join(sys.argv[1:]),
        config=dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                    seq_len=args.seq_len, batch_size=args.batch_size, steps=steps, lr=args.lr, seed=args.seed),
        tokens_per_variant=steps * args.batch_size * args.seq_len,
        train_tokens_available=train_windows.numel(), test_windows=test_windows.shape[0],
        tokenizer="byte (search/tiny.py)", threads=args.threads,
        target="TTM with >=30% fewer params within 10% of dense ppl",
    )
    stem = args.stem or ("ttm_scratch_quick" if args.quick else "ttm_scratch")
    rows = []
    for name, cfg, rank in variants:
        model = build(cfg, rank, args.seed)
        total, mlp = count(model)
        t0 = time.perf_counter()
        losses = train(model, train_windows, steps, args.batch_size, args.lr, args.seed)
        train_s = time.perf_counter() - t0
        ppl = window_perplexity(model, test_windows, batch_size=8)
        row = dict(variant=name, rank=rank, params=total, mlp_params=mlp, test_ppl=ppl, bits_per_byte=math.log2(ppl),
                   final_train_loss=sum(losses[-20:]) / len(losses[-20:]), train_s=round(train_s, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(rows, meta, stem, args)  # after every variant: a long run stopped early keeps its rows


def write_results(rows: list[dict], meta: dict, stem: str, args) -> None:
    dense = rows[0]
    for row in rows:
        row["params_vs_dense"] = row["params"] / dense["params"]
        row["ppl_vs_dense"] = row["test_ppl"] / dense["test_ppl"]
    hits = [r["variant"] for r in rows[1:] if r["params_vs_dense"] <= 0.70 and r["ppl_vs_dense"] <= 1.10 and r["rank"]]
    meta = dict(meta, target_met_by=hits)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    c = meta["config"]
    lines = [
        f"# TTM from scratch ({'quick' if args.quick else 'full'})", "",
        f"Command: `.venv/bin/python {meta['command']}`", "",
        f"Llama {c['layers']} layers, hidden {c['hidden']}, MLP {c['intermediate']}, {c['heads']} heads; byte tokenizer; "
        f"{c['steps']} steps x {c['batch_size']} x {c['seq_len']} = {meta['tokens_per_variant']:,} tokens per variant "
        f"(pydoc:train has {meta['train_tokens_available']:,}); seed {c['seed']}, lr {c['lr']}, {meta['threads']} thread(s). "
        f"Test: {meta['test_windows']} non-overlapping {c['seq_len']}-byte windows of pydoc:test joined by EOS; "
        "perplexity is per byte.", "",
        "| variant | params | MLP params | params vs dense | test ppl (per byte) | bits/byte | ppl vs dense | train loss (last 20) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['mlp_params']:,} | {r['params_vs_dense']:.2f} | "
                     f"{r['test_ppl']:.3f} | {r['bits_per_byte']:.3f} | {r['ppl_vs_dense']:.3f} | "
                     f"{r['final_train_loss']:.3f} | {r['train_s']} |")
    lines += ["", f"Target ({meta['target']}): " + (", ".join(hits) or "not met") + "."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
