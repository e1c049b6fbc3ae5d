"""Optimizers of the training runs: Adam(W) over weight-decay groups and the warmup + cosine learning rate."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import Config, require_finite


@dataclasses.dataclass
class OptimConfig(Config):
    """Adam(W). MAGVIT trains both networks with beta1 = 0, beta2 = 0.99."""

    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norms, biases, embeddings
    grad_clip: float = 1.0  # global norm; 0 disables

    def __post_init__(self):
        require_finite(self, ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"))
        if self.lr <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0:
            raise ValueError("optim: need lr > 0, 0 <= beta1, beta2 < 1, weight_decay >= 0")
        if self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("optim: need eps > 0 and grad_clip >= 0")


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from 1/warmup to 1 over ``warmup_steps``,
    then cosine decay from 1 to ``min_lr_ratio`` at ``max_steps`` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(torch.optim.lr_scheduler.LRScheduler):
    """``warmup_cosine`` as a scheduler; its ``state_dict`` (step counter) travels with DeepSpeed checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return [base * factor for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The position (step counter, base LRs) comes from the checkpoint, the shape (warmup, end, floor) stays
        the one this schedule was built with from the config in force: a resumed run with a new
        ``train.max_steps`` decays to its new end instead of silently keeping the old one."""
        shape = (self.warmup_steps, self.max_steps, self.min_lr_ratio)
        super().load_state_dict(state_dict)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = shape
        self.refresh()

    def refresh(self) -> None:
        """Set the optimizer's learning rates to the schedule's value at its current step (after a resume, as
        DeepSpeed may load the optimizer's param groups after the schedule)."""
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values


_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)


def weight_decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices / conv kernels; none for biases, norm parameters, embeddings
    and codebooks (decaying them shrinks scales and token vectors towards zero for no regularisation gain)."""
    no_decay_ids: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            lowered = full.lower()
            if (isinstance(module, (torch.nn.Embedding, *_NORM_TYPES)) or param.ndim < 2 or name.endswith("bias")
                    or "embed" in lowered or "codebook" in lowered or "norm" in lowered):
                no_decay_ids.add(id(param))
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adam(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW over the weight-decay groups: its fused kernel (built into torch, no JIT) where the parameters
    allow it (float on CPU or CUDA), 4.6x faster than the per-parameter loop over MAGVIT-B's 88 M on a CPU core."""
    groups = weight_decay_param_groups(model, optim.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=fused or None)
