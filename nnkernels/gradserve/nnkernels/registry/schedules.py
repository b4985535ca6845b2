"""The learning-rate schedule registry: each schedule's settings and its lr
as a function of t, the optimizer steps already taken (stepped once per
optimizer step, as a torch.optim.lr_scheduler stepped after each step)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .fields import MAX_COUNT, Field

# ScheduleSpec's settings
FIELDS = {
    "step_size": Field(int, 1, lo=1, hi=MAX_COUNT, doc="step: steps between decays"),
    "gamma": Field(float, 0.1, lo=0.0, lo_open=True, hi=1.0, doc="step, exponential: decay factor"),
    "t_max": Field(int, 1, lo=1, hi=MAX_COUNT, doc="cosine: steps of the half period"),
    "eta_min": Field(float, 0.0, lo=0.0, doc="cosine: the lowest lr"),
}


@dataclass(frozen=True)
class Schedule:
    """One schedule: ``lr(schedule_spec, base_lr, t)``; ``uses``: the
    settings it reads."""

    name: str
    torch: str
    uses: tuple[str, ...]
    lr: Callable
    formula: str


_ENTRIES = (
    Schedule("constant", "torch.optim.lr_scheduler.ConstantLR(factor=1)", (),
             lambda s, lr, t: lr, "lr"),
    Schedule("step", "torch.optim.lr_scheduler.StepLR", ("step_size", "gamma"),
             lambda s, lr, t: lr * s.gamma ** (t // s.step_size), "lr·gamma^(t // step_size)"),
    Schedule("exponential", "torch.optim.lr_scheduler.ExponentialLR", ("gamma",),
             lambda s, lr, t: lr * s.gamma ** t, "lr·gamma^t"),
    Schedule("cosine", "torch.optim.lr_scheduler.CosineAnnealingLR (closed form)", ("t_max", "eta_min"),
             lambda s, lr, t: s.eta_min + (lr - s.eta_min) * (1 + math.cos(math.pi * t / s.t_max)) / 2,
             "eta_min + (lr - eta_min)·(1 + cos(π·t/t_max))/2"),
)

SCHEDULES: dict[str, Schedule] = {s.name: s for s in _ENTRIES}


def scheduled_lr(schedule, base_lr: float, t: int) -> float:
    """The learning rate of ScheduleSpec ``schedule`` after ``t`` steps."""
    return SCHEDULES[schedule.name].lr(schedule, base_lr, t)
