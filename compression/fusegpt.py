"""FuseGPT learnable layer fusion (Pei et al., arXiv 2411.14507), written from the paper's
description in ../shared/reference/methods.md.

One block is pruned per step. Its weights are injected into each neighbour of a contiguous
group around it, layer type by layer type (q with q, down with down, ...):

    W_eff = W + sum_k (C_k @ D_k) * W_pruned_k        (* elementwise)
    b_eff = b + sum_k c_k * b_pruned_k

W and W_pruned_k stay frozen; C_k (out x r) starts at zero, so a freshly fused model computes
exactly what the model with the block removed computes; D_k (r x in) is Kaiming-initialised.
Then the group's coefficients are trained by local distillation: the fused group, fed the
group's input hidden states, should reproduce what the original group (pruned block included)
produced from the same inputs. Finally every fused layer folds back into its plain layer.

Choices the paper leaves open, and ours:
- Group: the pruned block and `group_size` neighbours, a contiguous window centred on it and
  shifted inward at the ends of the stack (public default 7 neighbours).
- Loss: the public code takes a softmax over the batch axis, which mixes unrelated windows. We
  use a per-token relative squared error, mean_t ||out_t - y_t||^2 / ||y_t||^2 (scale-free, so
  one lr fits every model, and not dominated by the huge attention-sink token, see
  `distillation_loss`); `loss="kl"` offers KL(softmax(y_t) || softmax(out_t)) over the hidden
  dimension per token instead. Measured on SmolLM2-135M (block 14, group 7, 20 steps, held-out
  per-token relative error; unhealed removal 0.0398): mse at lr 1e-2 reaches 0.0239, kl only
  0.0383 (lr 1e-2) / 0.0385 (lr 1e-3) -- one massive hidden dimension makes the softmax nearly
  one-hot, so the KL (~4e-8) carries almost no signal. Hence mse is the default.
- Data: importance is scored on the first `importance_samples` calibration windows; local
  distillation uses all windows (the public code's 1024 fine-tuning sequences are a GPU budget;
  here the budget is `steps` optimizer steps of `batch_size` windows per fused block).
- Optimiser: Adam(0.9, 0.95) with a cosine schedule from lr to 0 over the step budget; the
  coefficients are kept in float32 whatever the model's dtype (bf16 Adam updates on C would
  mostly round away), and the effective weight is cast back to the layer's dtype.
- Earlier fusions into a layer keep training when a later group covers that layer (their
  triples are appended, as the public code does); a pruned block that had received fusions
  contributes its current effective weights.
- GPT-2's Conv1D stores its weight as (in, out); there the factor order is transposed
  (C is in x r, D is r x out) so that everything stays in the layer's own layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from compression import arch
from compression.calibration import CalibrationData


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class FusedLinear(nn.Module):
    """A frozen linear layer plus injected pruned weights with learnable low-rank coefficients.

    Wraps `nn.Linear` or GPT-2's `Conv1D` (kept as `base_layer`); `fold()` returns that layer
    with the effective weight and bias written in.
    """

    is_fused_linear = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.coef_left = nn.ParameterList()  # C_k, zero-initialised
        self.coef_right = nn.ParameterList()  # D_k, Kaiming-initialised
        self.coef_bias = nn.ParameterList()  # c_k, zero-initialised (only when there are biases)
        self.num_sources = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_source(self, pruned_weight: torch.Tensor, pruned_bias: torch.Tensor | None, rank: int, generator: torch.Generator | None = None) -> None:
        """Inject one pruned layer's weight (same shape and layout as ours) with rank-r coefficients."""
        weight = self.base_layer.weight
        if pruned_weight.shape != weight.shape:
            raise ValueError(f"pruned weight {tuple(pruned_weight.shape)} does not match {tuple(weight.shape)}")
        if (pruned_bias is None) != (self.bias is None):
            raise ValueError("pruned layer and target layer must both have a bias or both not")
        rows, cols = weight.shape
        k = self.num_sources
        self.register_buffer(f"pruned_weight_{k}", pruned_weight.detach().to(weight.dtype).clone(), persistent=False)
        left = torch.zeros(rows, rank, device=weight.device, dtype=torch.float32)  # C: (rows, r)
        right = torch.empty(rank, cols, dtype=torch.float32)  # D: (r, cols)
        # Kaiming-uniform as nn.Linear / LoRA's A use (a=sqrt(5): bound = 1/sqrt(cols)).
        nn.init.kaiming_uniform_(right, a=math.sqrt(5), generator=generator)
        self.coef_left.append(nn.Parameter(left))
        self.coef_right.append(nn.Parameter(right.to(weight.device)))
        if pruned_bias is not None:
            self.register_buffer(f"pruned_bias_{k}", pruned_bias.detach().to(weight.dtype).clone(), persistent=False)
            self.coef_bias.append(nn.Parameter(torch.zeros(pruned_bias.shape, device=weight.device, dtype=torch.float32)))
        self.num_sources += 1

    def effective_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if self.num_sources == 0:
            return weight
        w = weight.float()
        for k in range(self.num_sources):
            mask = self.coef_left[k] @ self.coef_right[k]  # (rows, r) @ (r, cols) -> (rows, cols)
            w = w + mask * getattr(self, f"pruned_weight_{k}").float()
        return w.to(weight.dtype)

    def effective_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None or self.num_sources == 0:
            return bias
        b = bias.float()
        for k in range(self.num_sources):
            b = b + self.coef_bias[k] * getattr(self, f"pruned_bias_{k}").float()  # (out,)
        return b.to(bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective_weight(), self.effective_bias()
        if _is_conv1d(self.base_layer):
            # Conv1D: y = x @ W + b with W (in, out), computed as Conv1D itself does.
            out_shape = x.shape[:-1] + (weight.shape[1],)
            flat = x.reshape(-1, x.shape[-1])  # (B*T, in)
            y = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return y.view(out_shape)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The base layer with W_eff and b_eff written in: a plain layer, no overhead."""
        layer = self.base_layer
        weight, bias = self.effective_weight().detach().clone(), self.effective_bias()
        layer.weight = nn.Parameter(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def coefficients(self) -> list[nn.Parameter]:
        return [*self.coef_left, *self.coef_right, *self.coef_bias]


def fuse_into(target_block: nn.Module, pruned_block: nn.Module, rank: int, generator: torch.Generator | None = None) -> list[FusedLinear]:
    """Wrap each linear of `target_block` (if not yet wrapped) and inject the matching linear of
    `pruned_block`. Returns the fused layers of the target block.

    A layer whose counterpart is missing or has another shape (blocks pruned to different
    widths) is left as it is: for it, fusion is plain removal."""
    pruned = arch.linear_layers(pruned_block)
    fused = []
    for name, layer in arch.linear_layers(target_block).items():
        if name not in pruned or pruned[name].weight.shape != layer.weight.shape:
            continue
        if not isinstance(layer, FusedLinear):
            layer = FusedLinear(layer)
            arch.replace_submodule(target_block, name, layer)
        source = pruned[name]
        if isinstance(source, FusedLinear):
            weight, bias = source.effective_weight(), source.effective_bias()
        else:
            weight, bias = source.weight, source.bias
        layer.add_source(weight.detach(), None if bias is None else bias.detach(), rank, generator)
        fused.append(layer)
    return fused


def fold_fused(model: nn.Module) -> nn.Module:
    """Replace every FusedLinear in the model by its folded plain layer (in place)."""
    names = [name for name, m in model.named_modules() if isinstance(m, FusedLinear)]
    for name in names:
        arch.replace_submodule(model, name, model.get_submodule(name).fold())
    return model


def fused_layers(model: nn.Module) -> list[FusedLinear]:
    return [m for m in model.modules() if isinstance(m, FusedLinear)]


def group_window(position: int, num_blocks: int, group_size: int) -> range:
    """Positions of a contiguous window of `group_size + 1` blocks containing `position`,
    centred on it where possible (fewer when the model has fewer blocks)."""
    width = min(group_size + 1, num_blocks)
    start = min(max(position - group_size // 2, 0), num_blocks - width)
    return range(start, start + width)


# ------------------------------------------------------------------------- local distillation


LossName = Literal["mse", "kl"]


def distillation_loss(output: torch.Tensor, target: torch.Tensor, loss: LossName = "mse") -> torch.Tensor:
    """Distance of the group output (B, T, H) to the original group's output (B, T, H)."""
    output, target = output.float(), target.float()
    if loss == "mse":
        # Per-token relative squared error ||o_t - y_t||^2 / ||y_t||^2, averaged over tokens.
        # Not one global ratio: in SmolLM2 the first token's hidden state (the attention sink)
        # has norm ~23000 against ~150 elsewhere and would carry 99.5% of a global MSE.
        error = (output - target).pow(2).sum(-1)  # (B, T)
        return (error / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
    if loss == "kl":
        # KL(softmax(target) || softmax(output)) over the hidden dimension, mean over tokens.
        return F.kl_div(F.log_softmax(output, -1), F.log_softmax(target, -1), log_target=True, reduction="none").sum(-1).mean()
    raise ValueError(f"loss: unknown {loss!r} (valid: mse, kl)")


@dataclass
class DistillSettings:
    steps: int = 100  # optimizer steps
    lr: float = 1e-2  # fusion coefficients (see depth.FuseBlocksStep.lr for the measurement)
    batch_size: int = 4  # windows per step
    loss: LossName = "mse"
    seed: int = 0
    probe_windows: int = 8  # windows on which the loss is reported before and after training


@torch.no_grad()
def _group_io(model: nn.Module, group: range, calibration: CalibrationData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to the group's first block and the group's outputs, (N, T, H) each."""
    device, _ = arch.model_device_dtype(model)
    calls = arch.capture_block_calls(model, calibration.seq_len)
    blocks = arch.decoder_blocks(model)
    inputs, targets = [], []
    for ids in calibration.batches(batch_size, device):
        x = arch.block_input(model, ids, group.start)  # (B, T, H)
        inputs.append(x)
        targets.append(arch.run_blocks([blocks[i] for i in group], [calls[i] for i in group], x))
    return torch.cat(inputs), torch.cat(targets)


@torch.no_grad()
def _mean_loss(blocks, calls, inputs, targets, settings: DistillSettings) -> float:
    total = 0.0
    for start in range(0, inputs.shape[0], settings.batch_size):
        out = arch.run_blocks(blocks, calls, inputs[start : start + settings.batch_size])
        total += distillation_loss(out, targets[start : start + settings.batch_size], settings.loss).item() * out.shape[0]
    return total / inputs.shape[0]


def distill(
    blocks: list[nn.Module],
    calls: list[arch.BlockCall],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Iterable[nn.Parameter],
    settings: DistillSettings,
) -> tuple[float, float]:
    """Train `params` so that `blocks` map `inputs` to `targets` (N, T, H); returns the mean
    loss on the first `probe_windows` windows before and after. Other parameters are untouched."""
    params = list(params)
    probe = slice(0, settings.probe_windows)  # before/after measured on the first windows
    before = _mean_loss(blocks, calls, inputs[probe], targets[probe], settings)
    if settings.steps == 0 or not params:
        return before, before
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(inputs.shape[0], generator=generator)
    cursor = 0
    for _ in range(settings.steps):
        if cursor + settings.batch_size > len(order):  # next epoch: fresh shuffle
            order, cursor = torch.randperm(inputs.shape[0], generator=generator), 0
        pick = order[cursor : cursor + settings.batch_size].to(inputs.device)
        cursor += settings.batch_size
        with torch.enable_grad():
            out = arch.run_blocks(blocks, calls, inputs[pick])  # (b, T, H)
            loss = distillation_loss(out, targets[pick], settings.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return before, _mean_loss(blocks, calls, inputs[probe], targets[probe], settings)


def _frozen(model: nn.Module) -> dict[str, bool]:
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def _restore(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, False))


def _shrink_group(model, position, calibration, group_size, settings, make_params) -> dict:
    """Record the group's input/target, remove block `position`, train `make_params(...)`."""
    n = len(arch.decoder_blocks(model))
    group = group_window(position, n, group_size)
    inputs, targets = _group_io(model, group, calibration, settings.batch_size)
    pruned_block = arch.decoder_blocks(model)[position]
    arch.remove_blocks(model, [position])
    kept = range(group.start, group.stop - 1)  # the group's positions after the removal
    blocks = [arch.decoder_blocks(model)[i] for i in kept]
    flags = _frozen(model)
    try:
        params = make_params(blocks, pruned_block)
        calls = arch.capture_block_calls(model, calibration.seq_len)
        before, after = distill(blocks, [calls[i] for i in kept], inputs, targets, params, settings)
    finally:
        _restore(model, flags)
    return {"removed": position, "group": [group.start, group.stop - 1], "loss_before": before, "loss_after": after}


def fuse_block(model: nn.Module, position: int, calibration: CalibrationData, rank: int = 128, group_size: int = 7, settings: DistillSettings | None = None) -> dict:
    """One FuseGPT step: fuse block `position` into its group's neighbours and train the
    coefficients by local distillation. Leaves FusedLinear layers in place (see `fold_fused`).
    Returns {removed, group (first, last position before removal), loss_before, loss_after}."""
    settings = settings or DistillSettings()
    generator = torch.Generator().manual_seed(settings.seed + position)

    def inject(blocks, pruned_block):
        params = []
        for block in blocks:
            params += [p for layer in fuse_into(block, pruned_block, rank, generator) for p in layer.coefficients()]
        return params

    return _shrink_group(model, position, calibration, group_size, settings, inject)


def heal_block_removal(model: nn.Module, position: int, calibration: CalibrationData, group_size: int = 7, settings: DistillSettings | None = None) -> dict:
    """The fair baseline to fusion: remove block `position`, then fine-tune every parameter of
    the same neighbours with the same local distillation, data and step budget."""
    settings = settings or DistillSettings(lr=3e-4)
    return _shrink_group(  # the neighbours are trained in place: on weights of their own
        model, position, calibration, group_size, settings, lambda blocks, _: [p for b in blocks for p in arch.own_parameters(b)]
    )
