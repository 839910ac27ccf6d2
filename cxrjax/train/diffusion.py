"""DDPM trainer: state, the pure jitted train step, and the jitted class-conditional sampler.

`train_step(state, batch, rng) -> (state, metrics)` is pure and written for one device; it is
compiled once with the batch sharded over the mesh's "data" axis and the state replicated and
donated (see `cxrjax.parallel`), exactly like the classifier's step. The loss is
`cxrjax.diffusion.diffusion_loss` (Ho et al.'s simple loss, eps- or v-prediction) with label
dropout for classifier-free guidance; EMA of the params has TF-style warm-up; a NaN/Inf loss or
gradient leaves the state unchanged (counted in `nonfinite_steps`).

The sampler takes the params as an argument (never closed over), so one compiled DDIM program
serves every checkpoint: `sample(params, rng, labels) -> images [N, H, W, 1] in [-1, 1]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cxrjax import diffusion, parallel
from cxrjax.models import unet
from cxrjax.train import optim
from cxrjax.train import state as state_lib

DTYPES = state_lib.DTYPES
MODELS = {
    "unet_tiny": unet.unet_tiny,
    "unet_demo28": unet.unet_demo28,
    "unet_demo32": unet.unet_demo32,
    "unet_cifar32": unet.unet_cifar32,
    "unet_128": unet.unet_128,
    "unet_256": unet.unet_256,
}
NOISE_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


DiffusionState = state_lib.DiffusionState  # defined with the other train states


# ----------------------------------------------------------------------------- model & schedule
def make_model(model_config: Mapping[str, Any], num_classes: int) -> unet.UNet:
    """The named UNet preset; class-conditional (with a null label) when the config says so."""
    return MODELS[model_config["name"]](
        num_classes=num_classes if model_config["conditional"] else 0,
        dtype=DTYPES[model_config["dtype"]],
        remat=bool(model_config["remat"]),
    )


def make_noise_schedule(diffusion_config: Mapping[str, Any]) -> diffusion.Schedule:
    """The forward-process schedule (linear betas of Ho et al., or Nichol & Dhariwal's cosine)."""
    T = int(diffusion_config["num_timesteps"])
    if diffusion_config["schedule"] == "cosine":
        return diffusion.cosine_schedule(T)
    return diffusion.linear_schedule(
        T, float(diffusion_config["beta_start"]), float(diffusion_config["beta_end"])
    )


# ----------------------------------------------------------------------------- state & steps
def init_state(
    model: unet.UNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
) -> DiffusionState:
    init_rng, run_rng = jax.random.split(rng)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    params = model.init(init_rng, x, t, labels, train=False)["params"]
    return DiffusionState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=run_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def make_train_step(
    model: unet.UNet,
    tx: optax.GradientTransformationExtraArgs,
    schedule: diffusion.Schedule,
    *,
    lr_schedule: optax.Schedule,
    prediction: str = "eps",
    label_dropout: float = 0.0,
    ema_decay: float = 0.999,
):
    """The pure step: diffusion loss, optimizer, EMA with warm-up; non-finite updates skipped."""
    apply_fn = unet.make_apply_fn(model)
    conditional = model.num_classes > 0
    null_id = model.null_id if conditional else None

    def train_step(state: DiffusionState, batch, rng):
        labels = batch["label"].astype(jnp.int32) if conditional else None

        def loss_of(params):
            return diffusion.diffusion_loss(
                apply_fn,
                params,
                schedule,
                batch["image"],
                labels,
                rng,
                prediction=prediction,
                label_dropout=label_dropout if conditional else 0.0,
                null_id=null_id,
            )

        (loss, loss_metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        # Warm-up (as in TF's ExponentialMovingAverage): early averages follow the params.
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = optim.ema_update(state.ema_params, params, decay)
        grad_norm = optax.tree.norm(grads)
        finite = state_lib.is_finite(loss, grad_norm)
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        kept = state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)
        new_state = state_lib.select(finite, new_state, kept)
        metrics = {
            **loss_metrics,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "nonfinite_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    return train_step


def make_sample_fn(
    model: unet.UNet,
    schedule: diffusion.Schedule,
    image_shape: tuple[int, int, int],
    *,
    steps: int,
    prediction: str = "eps",
    guidance_scale: float = 0.0,
    eta: float = 0.0,
):
    """`sample(params, rng, labels) -> images [N, *image_shape]` in [-1, 1] by DDIM.

    `steps` is static; `guidance_scale` w > 0 uses classifier-free guidance
    ((1 + w) cond - w uncond). `labels` is ignored by an unconditional model (pass anything of
    shape [N]). The same (params, rng, labels) give the same images.
    """
    conditional = model.num_classes > 0

    def sample(params, rng, labels):
        model_fn = unet.make_model_fn(model, params)
        return diffusion.ddim_sample(
            model_fn,
            schedule,
            rng,
            (labels.shape[0], *image_shape),
            labels.astype(jnp.int32) if conditional else None,
            steps=steps,
            eta=eta,
            prediction=prediction,
            guidance_scale=guidance_scale if conditional and guidance_scale > 0 else None,
            null_id=model.null_id if conditional else None,
        )

    return sample


def compile_steps(
    model,
    tx,
    schedule,
    mesh,
    abstract_state,
    *,
    lr_schedule,
    prediction,
    label_dropout,
    ema_decay,
    image_shape,
    sample_steps,
    guidance_scale=0.0,
    sample_eta=0.0,
):
    """Jits train/sample once: batch sharded over "data", state replicated and donated.

    The sampler's params, key and labels are replicated (a sample grid is small); its output
    is replicated so every process holds the whole grid.
    """
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.data_sharding(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    train_step = jax.jit(
        make_train_step(
            model,
            tx,
            schedule,
            lr_schedule=lr_schedule,
            prediction=prediction,
            label_dropout=label_dropout,
            ema_decay=ema_decay,
        ),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
        compiler_options=parallel.cpu_compiler_options(),
    )
    sample = jax.jit(
        make_sample_fn(
            model,
            schedule,
            image_shape,
            steps=sample_steps,
            prediction=prediction,
            guidance_scale=guidance_scale,
            eta=sample_eta,
        ),
        in_shardings=(replicated, replicated, replicated),
        compiler_options=parallel.cpu_compiler_options(),
        out_shardings=replicated,
    )
    return train_step, sample
