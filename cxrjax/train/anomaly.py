"""f-AnoGAN encoder training, izi_f variant (Schlegl et al., Medical Image Analysis 2019).

The encoder E maps an image to the latent of a trained, frozen PGGAN generator G (its EMA
parameters, at the final resolution, alpha = 1); it learns on normal images only, by

    L(x) = mean_pixels (x - G(E(x)))^2  +  kappa * mean_features (f_D(x) - f_D(G(E(x))))^2

where f_D are the frozen discriminator's penultimate features (the LeakyReLU output of the
4x4 head's first dense layer, nf(0) wide). The same two terms, per image, are the anomaly
score (`izif_terms`), so training and scoring share one function.

f_D is evaluated per image (`jax.vmap` over a batch of one): PGGAN's minibatch-stddev layer
would otherwise mix statistics of neighbouring images into every image's features, and an
image's score would depend on what it was batched with. Each image is then its own
minibatch-stddev group (that channel is a constant ~1e-4 for x and G(E(x)) alike).
A conditional (AC-GAN) generator gets the normal class as its label; PGGAN's D takes no label.

`train_step(state, batch, rng, frozen) -> (state, metrics)` is pure and written for one device;
`compile_train_step` jits it with the batch sharded over the "data" axis, the encoder state
replicated and donated, and binds the frozen G/D parameters (passed as an argument, never
baked into the program as constants), returning the `(state, batch, rng)` callable `loop.run`
expects. This module imports no data stack.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cxrjax import parallel
from cxrjax.models import encoder as encoder_lib
from cxrjax.models import layers
from cxrjax.train import state as state_lib

# The discriminator submodule whose output (after LeakyReLU) is f_D: the head's first dense.
FEATURE_LAYER = ("block_4x4", "dense0")


EncoderState = state_lib.EncoderState  # defined with the other train states


def make_encoder(encoder_config, latent_dim: int) -> encoder_lib.Encoder:
    """The encoder from its config section (widths, output normalisation)."""
    return encoder_lib.Encoder(
        latent_dim=int(latent_dim),
        base_features=int(encoder_config["base_features"]),
        max_features=int(encoder_config["max_features"]),
        output=str(encoder_config["output"]),
    )


def init_state(encoder, tx: optax.GradientTransformation, rng, image_shape) -> EncoderState:
    init_rng, run_rng = jax.random.split(rng)
    params = encoder.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return EncoderState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=run_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def _is_feature_layer(module, method_name: str) -> bool:
    return method_name == "__call__" and module.path == FEATURE_LAYER


def discriminator_features(discriminator, d_params, images: jax.Array, resolution: int):
    """f_D(images): [B, nf(0)] penultimate features, each image evaluated on its own."""

    def one(image):  # [R, R, C] -> [F]
        _, captured = discriminator.apply(
            {"params": d_params},
            image[None],
            resolution=resolution,
            capture_intermediates=_is_feature_layer,
            mutable=["intermediates"],
        )
        node = captured["intermediates"]
        for name in FEATURE_LAYER:
            node = node[name]
        return layers.leaky_relu(node["__call__"][0][0])

    return jax.vmap(one)(images)


def izif_terms(
    encoder,
    generator,
    discriminator,
    e_params,
    g_params,
    d_params,
    images: jax.Array,
    *,
    resolution: int,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-image izi_f terms and the reconstruction of `images` [B, R, R, C] in [-1, 1].

    Returns {"residual": [B] mean squared pixel error, "feature": [B] mean squared f_D error,
    "reconstruction": G(E(x)) [B, R, R, C]}. `labels` [B] condition a conditional G.
    """
    images = images.astype(jnp.float32)
    latents = encoder.apply({"params": e_params}, images)
    labels = labels if generator.num_classes else None
    recon = generator.apply({"params": g_params}, latents, labels, resolution=resolution)
    recon = recon.astype(jnp.float32)
    residual = jnp.mean(jnp.square(images - recon), axis=(1, 2, 3))
    # f_D(x) does not depend on E: no gradient needed through the real branch.
    f_real = jax.lax.stop_gradient(
        discriminator_features(discriminator, d_params, images, resolution)
    )
    f_fake = discriminator_features(discriminator, d_params, recon, resolution)
    feature = jnp.mean(jnp.square(f_real - f_fake), axis=-1)
    return {"residual": residual, "feature": feature, "reconstruction": recon}


def normal_labels(generator, batch_size: int, normal_label: int) -> jax.Array | None:
    """The conditioning labels for a batch: the normal class everywhere (None if unconditional)."""
    if not generator.num_classes:
        return None
    return jnp.full((batch_size,), normal_label, jnp.int32)


def make_loss_fn(encoder, generator, discriminator, *, resolution: int, kappa: float, normal_label):
    """`loss(e_params, frozen, images) -> (loss, metrics)`: mean of residual + kappa * feature."""

    def loss_fn(e_params, frozen, images):
        terms = izif_terms(
            encoder,
            generator,
            discriminator,
            e_params,
            frozen["generator"],
            frozen["discriminator"],
            images,
            resolution=resolution,
            labels=normal_labels(generator, images.shape[0], normal_label),
        )
        residual, feature = jnp.mean(terms["residual"]), jnp.mean(terms["feature"])
        loss = residual + kappa * feature
        return loss, {"loss": loss, "residual": residual, "feature": feature}

    return loss_fn


def make_train_step(
    encoder,
    generator,
    discriminator,
    tx: optax.GradientTransformation,
    *,
    resolution: int,
    kappa: float = 1.0,
    normal_label: int = 0,
    lr_schedule: optax.Schedule | None = None,
):
    """The pure step `(state, batch, rng, frozen) -> (state, metrics)`; no randomness is used.

    `frozen` = {"generator": EMA G params, "discriminator": D params}; only E is updated. A
    NaN/Inf loss or gradient leaves the state unchanged (counted in `nonfinite_steps`).
    """
    loss_fn = make_loss_fn(
        encoder,
        generator,
        discriminator,
        resolution=resolution,
        kappa=kappa,
        normal_label=normal_label,
    )

    def train_step(state: EncoderState, batch, rng, frozen):
        del rng  # deterministic objective; kept for the loop's (state, batch, rng) contract
        images = batch["image"]
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, images
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = state_lib.is_finite(loss, grad_norm)
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        kept = state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)
        new_state = state_lib.select(finite, updated, kept)
        metrics = {**metrics, "grad_norm": grad_norm, "nonfinite_steps": new_state.nonfinite_steps}
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        return new_state, metrics

    return train_step


def compile_train_step(train_step, mesh, abstract_state, frozen):
    """Jits `train_step` over the mesh and binds `frozen`: returns `(state, batch, rng)`.

    Batch sharded over "data"; encoder state, key and frozen parameters replicated; the state
    is donated. The frozen trees are placed on the mesh once, here.
    """
    replicated = parallel.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    frozen_sharding = jax.tree.map(lambda _: replicated, frozen)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sharding, parallel.data_sharding(mesh), replicated, frozen_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
        compiler_options=parallel.cpu_compiler_options(),
    )
    frozen = jax.device_put(frozen, frozen_sharding)
    return functools.partial(_bound_step, jitted, frozen)


def _bound_step(jitted, frozen, state, batch, rng):
    return jitted(state, batch, rng, frozen)
