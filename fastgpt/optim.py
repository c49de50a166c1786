"""The training loop's optimizers and learning-rate schedules.

Optimizers (``--optimizer``):

``adamw``  AdamW on every parameter, weight decay on matrices and embeddings only: nanoGPT's recipe,
           for runs that must match it step for step.
``muon``   PyTorch's Muon (``torch.optim.Muon``, torch >= 2.9) on the transformer blocks' matrices
           (the attention and MLP projections), each update orthogonalised by Newton-Schulz
           iterations; AdamW, as above, on the rest: the embeddings (and the head tied to them),
           LayerNorm gains and biases, which Muon does not take.

Schedules (``--lr_schedule``), each after a linear warmup to the peak and ending at ``min_lr`` at
``lr_decay_iters``: ``cosine`` (nanoGPT's), ``linear``, and ``wsd`` (warmup-stable-decay: the peak
held until the last ``decay_fraction`` of the steps, then a linear decay). Every parameter group
follows one schedule, as a fraction of its own peak learning rate.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "linear")


def lr_factor(step: int, warmup_iters: int, decay_iters: int, min_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2) -> float:
    """The learning rate at ``step`` as a fraction of the peak: ``min_ratio`` (min_lr / peak) at and
    after ``decay_iters``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup_iters:
        return (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_ratio
    if schedule == "wsd":
        decay_start = decay_iters - decay_fraction * (decay_iters - warmup_iters)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(decay_iters - decay_start, 1)
        return 1.0 - progress * (1.0 - min_ratio)
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    if schedule == "linear":
        return 1.0 - progress * (1.0 - min_ratio)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def adamw(params, weight_decay: float, learning_rate: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only, not on biases or LayerNorm.

    ``device_type`` is ``"cuda"``, ``"cpu"``, ...; on CUDA and CPU the fused AdamW implementation is
    used (one kernel over all parameters).
    """
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device_type in ("cuda", "cpu") else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, **fused)


def muon_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the parameters Muon takes: the 2-D weights inside the transformer blocks."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")]


class Optimizer:
    """The run's optimizers stepped as one (``{"muon": ..., "adamw": ...}``, or AdamW alone), each
    parameter group keeping its peak learning rate (``peak_lr``) for the schedule to scale."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts
        self._unscaled = False
        for group in self.param_groups:
            group.setdefault("peak_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """Every group's learning rate to ``factor`` times its peak."""
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * factor

    def unscale_(self, scaler) -> None:
        """The gradients unscaled by ``scaler`` (a GradScaler), e.g. before clipping them."""
        for part in self.parts.values():
            scaler.unscale_(part)
        self._unscaled = True

    def step(self, scaler) -> None:
        """One step of every optimizer through ``scaler``; all of them skip it when any gradient holds
        an inf or NaN. (A GradScaler decides for each optimizer on its own gradients: Muon would step
        while AdamW skipped.) ``scaler.update()`` then lowers the scale as usual."""
        if len(self.parts) > 1 and scaler.is_enabled():
            if not self._unscaled:
                self.unscale_(scaler)
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                self._unscaled = False
                return
        for part in self.parts.values():
            scaler.step(part)
        self._unscaled = False

    def zero_grad(self) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s result (or a single AdamW state, as checkpoints before Muon hold)."""
        if "state" in state and "param_groups" in state:
            state = {"adamw": state}
        if set(state) != set(self.parts):
            raise ValueError(f"the checkpoint's optimizer state is for {' and '.join(sorted(state))}, this run "
                             f"uses {' and '.join(sorted(self.parts))}: resume with the run's own --optimizer")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def build(model: torch.nn.Module, kind: str, device_type: str, *, learning_rate: float, weight_decay: float,
          betas: tuple[float, float], muon_lr: float = 0.02, muon_momentum: float = 0.95,
          muon_weight_decay: float = 0.1) -> Optimizer:
    """The optimizer ``kind`` (one of :data:`OPTIMIZERS`) over ``model``'s parameters."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}: expected one of {', '.join(OPTIMIZERS)}")
    if kind == "adamw":
        return Optimizer({"adamw": adamw(model.parameters(), weight_decay, learning_rate, betas, device_type)})
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    named = dict(model.named_parameters())
    matrices = muon_parameters(model)
    rest = [p for name, p in named.items() if name not in set(matrices)]
    muon = torch.optim.Muon([named[name] for name in matrices], lr=muon_lr, momentum=muon_momentum,
                            weight_decay=muon_weight_decay)
    return Optimizer({"muon": muon, "adamw": adamw(rest, weight_decay, learning_rate, betas, device_type)})
