"""Train states: explicit pytrees of arrays (no functions inside), checkpointed whole."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


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


def select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `keep_new` else `old`, leaf by leaf (skips a non-finite update in-graph)."""
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def all_finite(*trees: Any) -> jax.Array:
    """True when every floating leaf of every tree is finite."""
    leaves = [
        x for tree in trees for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
