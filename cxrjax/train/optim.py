"""Optimizers and learning-rate schedules from a config section (optax only).

Schedules: constant, cosine (warm-up + cosine decay), plateau (optax's reduce_on_plateau on the
training loss) and val_plateau (CheXNet: the learning rate is multiplied by `plateau_factor`
after `plateau_patience` evaluations without a better *validation* loss). val_plateau keeps its
scale, best loss and count in the optimizer state (`PlateauState`, so checkpoints carry it);
the driver feeds each validation loss through `plateau_observe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cxrjax import config as config_lib

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "plateau", "val_plateau")
PLATEAU_RTOL = 1e-4  # "better" = below best * (1 - rtol), as torch's ReduceLROnPlateau
# Field rules (config.check_fields) for the trainers that build their optimizer here.
RULES = (
    ("optim.name", config_lib.choice(*OPTIMIZERS)),
    ("optim.schedule", config_lib.choice(*SCHEDULES)),
)


class PlateauState(NamedTuple):
    """val_plateau's state: current scale of the updates, best validation loss, evaluations
    since it improved, and decays so far."""

    scale: jax.Array
    best: jax.Array
    bad_evals: jax.Array
    decays: jax.Array


def scale_by_val_plateau() -> optax.GradientTransformation:
    """Multiplies updates by the plateau scale; `plateau_observe` changes the scale."""

    def init_fn(params):
        del params
        return PlateauState(
            scale=jnp.ones((), jnp.float32),
            # Finite (the loop refuses to checkpoint a state holding inf): any loss beats it.
            best=jnp.full((), jnp.finfo(jnp.float32).max, jnp.float32),
            bad_evals=jnp.zeros((), jnp.int32),
            decays=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _is_plateau(node) -> bool:
    return isinstance(node, PlateauState)


def plateau_observe(opt_state: Any, val_loss: jax.Array, factor: float, patience: int) -> Any:
    """The optimizer state after one validation loss (pure; jit it). No-op without val_plateau.

    Better = below best * (1 - PLATEAU_RTOL); after `patience` evaluations in a row that are
    not better, the scale is multiplied by `factor` and the count restarts.
    """

    def observe(node):
        if not _is_plateau(node):
            return node
        better = val_loss < node.best * (1.0 - PLATEAU_RTOL)
        bad = jnp.where(better, 0, node.bad_evals + 1)
        decay = bad >= patience
        return PlateauState(
            scale=jnp.where(decay, node.scale * factor, node.scale).astype(jnp.float32),
            best=jnp.where(better, val_loss, node.best).astype(jnp.float32),
            bad_evals=jnp.where(decay, 0, bad).astype(jnp.int32),
            decays=(node.decays + decay).astype(jnp.int32),
        )

    return jax.tree.map(observe, opt_state, is_leaf=_is_plateau)


def plateau_scale(opt_state: Any) -> jax.Array:
    """The product of the val_plateau scales in an optimizer state (1 without val_plateau)."""
    scale = jnp.ones((), jnp.float32)
    for node in jax.tree.leaves(opt_state, is_leaf=_is_plateau):
        if _is_plateau(node):
            scale = scale * node.scale
    return scale


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
    if optim["schedule"] == "val_plateau":
        if int(optim.get("plateau_patience", 1)) < 1:
            raise config_lib.ConfigError("config.optim.plateau_patience: val_plateau needs >= 1")
        parts.append(scale_by_val_plateau())
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
