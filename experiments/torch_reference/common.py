"""Pieces of a kdjax step written in plain PyTorch, shared by step_server.py and fashion_mnist.py.

Each mirrors the kdjax function named in its docstring, so that the PyTorch side does the same
work with the same semantics: augmentation on uint8 NHWC images inside the step, normalisation,
coupled L2 weight decay on kernels only (kdjax.optim's default), per-step learning-rate schedules
(optax's convention: update k uses schedule(k)), and the CE + KD objective (RepDistiller's
DistillKL: T^2 * batch-mean KL).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, crop_padding: int = 0, flip: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """kdjax.data.augment on a uint8 (B, H, W, C) batch: zero-pad by `crop_padding`, crop back to
    H x W at a uniform random offset per example, mirror left-right with probability 1/2."""
    if not crop_padding and not flip:
        return images
    b, h, w, _ = images.shape
    dev = images.device
    if crop_padding:
        p = crop_padding
        padded = F.pad(images, (0, 0, p, p, p, p))  # (B, H+2p, W+2p, C)
        oy = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (B, 1, W)
        images = padded[torch.arange(b, device=dev)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand((b,), device=dev, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(2), images)
    return images


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """kdjax.data.normalize: uint8 (B, H, W, C) -> float32 (B, C, H, W), (x / 255 - mean) / std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def make_optimizer(model: torch.nn.Module, spec: dict) -> torch.optim.Optimizer:
    """kdjax.optim.make_optimizer for 'sgd', 'adam' and 'adamw': weight decay (coupled L2 for sgd and
    adam, as torch does it; decoupled for adamw) on kernels only (parameters with ndim > 1) unless
    spec['decay_all']."""
    wd = float(spec.get("weight_decay", 0.0))
    decay = [p for p in model.parameters() if p.ndim > 1 or spec.get("decay_all")]
    rest = [p for p in model.parameters() if not (p.ndim > 1 or spec.get("decay_all"))]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    name, lr = spec["name"], float(spec["lr"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(spec.get("momentum", 0.9)),
                               nesterov=bool(spec.get("nesterov", False)))
    if name in ("adam", "adamw"):  # adamw: decoupled decay, p -= lr * wd * p (optax.adamw's, torch's AdamW's)
        eps = spec.get("eps")
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(
            groups, lr=lr, betas=(float(spec.get("b1", 0.9)), float(spec.get("b2", 0.999))),
            eps=1e-8 if eps is None else float(eps))
    raise ValueError(f"optimizer {name!r}: only sgd, adam and adamw have a PyTorch counterpart here")


def lr_factor(spec: dict):
    """kdjax.optim.make_schedule as a factor of the base rate at update k (no warm-up):
    constant; cosine to 0 at total_steps; multistep (x factor at each boundary, in steps)."""
    name = spec.get("name", "constant")
    if name == "constant":
        return lambda k: 1.0
    if name == "cosine":
        total = int(spec["total_steps"])
        return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))
    if name == "multistep":
        bounds, factor = [int(b) for b in spec["boundaries"]], float(spec.get("factor", 0.1))
        return lambda k: factor ** sum(k >= b for b in bounds)
    raise ValueError(f"schedule {name!r}: only constant, cosine and multistep have a PyTorch counterpart here")


def kd_objective(student_logits, labels, teacher_logits, ce_weight: float, kd_weight: float, temperature: float):
    """ce_weight * CE(labels) + kd_weight * T^2 * batchmean KL(softmax(t/T) || softmax(s/T))
    (kdjax.losses.cross_entropy and kdjax.losses.kd; kd_weight 0 or no teacher: CE only)."""
    s = student_logits.float()
    loss = ce_weight * F.cross_entropy(s, labels) if ce_weight else s.new_zeros(())
    if kd_weight and teacher_logits is not None:
        t = temperature
        kd = F.kl_div(F.log_softmax(s / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                      reduction="batchmean", log_target=True) * t * t
        loss = loss + kd_weight * kd
    return loss
