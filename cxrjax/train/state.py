"""Train states of every family: explicit pytrees of arrays (no functions inside), checkpointed
whole; and the helpers the steps share (skip a non-finite update in-graph)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# Compute dtypes by config name (model.dtype); parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class ClassifierState:
    """Everything a classifier run needs to continue exactly where it stopped.

    `rng` is the run's base key (uint32[2]); step keys are `fold_in(rng, step)`, so randomness
    depends only on (seed, step). `ema_params` is `params`-shaped, or None when EMA is off.
    `nonfinite_steps` counts updates skipped because a loss or gradient was NaN/Inf.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


@struct.dataclass
class DiffusionState:
    """Everything a DDPM run needs to continue exactly where it stopped.

    `rng` is the run's base key; the loop passes `fold_in(rng, step)` to each step, so the
    randomness (timesteps, noise, label drops, dropout) depends only on (seed, step).
    `nonfinite_steps` counts updates skipped because the loss or gradient was NaN/Inf.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


@struct.dataclass
class GANState:
    """Everything a PGGAN run needs to continue exactly; `images_seen` fixes phase and alpha."""

    step: jax.Array
    images_seen: jax.Array
    g_params: Any
    d_params: Any
    g_ema_params: Any
    g_opt_state: Any
    d_opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


@struct.dataclass
class EncoderState:
    """Everything an encoder run needs to continue exactly (the frozen G/D live elsewhere)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


def select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    """`new` if `keep_new` else `old` (skips a non-finite update in-graph).

    One `lax.cond` over the whole tree: far cheaper to compile than a `where` per leaf.
    """
    return jax.lax.cond(keep_new, lambda pair: pair[0], lambda pair: pair[1], (new, old))


def is_finite(*scalars: jax.Array) -> jax.Array:
    """True when every given scalar is finite; pass the loss and the global gradient norm
    (finite exactly when every gradient entry is, barring float32 overflow of the norm)."""
    return jnp.all(jnp.stack([jnp.isfinite(jnp.asarray(x, jnp.float32)) for x in scalars]))
