"""Optimizers and learning-rate schedules from a config section (optax only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from cxrjax import config as config_lib

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "plateau")
# Field rules (config.check_fields) for the trainers that build their optimizer here.
RULES = (
    ("optim.name", config_lib.choice(*OPTIMIZERS)),
    ("optim.schedule", config_lib.choice(*SCHEDULES)),
)


def validate(optim: Mapping[str, Any]) -> None:
    """Fails before any compute on unknown names or impossible values (ConfigError naming the
    field, the value and what is allowed)."""
    for field, rule in (
        ("name", config_lib.choice(*OPTIMIZERS)),
        ("schedule", config_lib.choice(*SCHEDULES)),
        ("lr", config_lib.number(gt=0)),
        ("warmup_steps", config_lib.integer(ge=0)),
    ):
        if field in optim:
            problem = rule.problem(optim[field])
            if problem:
                raise config_lib.ConfigError(
                    f"config.optim.{field}: {problem}, got {optim[field]!r}"
                )


def make_schedule(optim: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warm-up, then constant or cosine decay to `lr * final_lr_fraction`.

    The plateau schedule is constant here; its decay is applied by `reduce_on_plateau` in
    `make_optimizer`, which scales updates when the training loss stops improving.
    """
    lr, warmup = float(optim["lr"]), int(optim.get("warmup_steps", 0))
    if optim["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1),
            end_value=lr * float(optim.get("final_lr_fraction", 0.0)),
        )
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    return optax.constant_schedule(lr)


def make_optimizer(
    optim: Mapping[str, Any], num_steps: int
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """Returns (optimizer, schedule). The optimizer's `update` accepts `value=loss`."""
    validate(optim)
    schedule = make_schedule(optim, num_steps)
    name = optim["name"]
    if name == "adam":
        base = optax.adam(schedule, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999))
    elif name == "adamw":
        base = optax.adamw(
            schedule,
            b1=optim.get("b1", 0.9),
            b2=optim.get("b2", 0.999),
            weight_decay=optim.get("weight_decay", 1e-4),
        )
    else:
        base = optax.sgd(schedule, momentum=optim.get("momentum", 0.9), nesterov=True)
    parts = []
    if optim.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(optim["grad_clip_norm"])))
    if name == "sgd" and optim.get("weight_decay"):
        parts.append(optax.add_decayed_weights(float(optim["weight_decay"])))
    parts.append(base)
    if optim["schedule"] == "plateau":
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=optim.get("plateau_factor", 0.1),
                patience=optim.get("plateau_patience", 5),
                accumulation_size=optim.get("plateau_window", 50),
            )
        )
    return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float | Any) -> Any:
    """Exponential moving average of parameters (decay may be a traced scalar)."""
    return optax.incremental_update(params, ema, step_size=1.0 - decay)
