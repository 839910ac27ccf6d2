"""PGGAN training (Karras et al., ICLR 2018): state, the progressive schedule and the pure step.

The schedule is a pure function of `images_seen`, the one counter that decides everything:
4x4 trains "stable" for `stable_images`, then each next resolution up to the maximum first
fades in over `fade_images` (alpha 0 -> 1) and then trains stable for `stable_images`. The
phase of a step is the phase of `images_seen` *before* the step; alpha is computed in-graph from
the traced `state.images_seen`, so fading never recompiles and a resumed run continues exactly.

One compiled step per resolution (static): the fade and stable phases of a resolution share it.
Each step is one D update (WGAN-GP, lambda 10, drift 1e-3, AC-GAN terms when conditional) and
one G update against the updated D, then an EMA of G (beta 0.999), with Adam(1e-3, 0, 0.99,
1e-8) for both, as in the official `train.py` defaults. Optimizer states are reset in-graph at
phase starts (official `reset_opt_for_new_lod`: at each fade start and each stable start), or at
resolution starts only, or never. This module imports no data stack.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cxrjax import parallel
from cxrjax.models import pggan
from cxrjax.train import diffaugment as diffaugment_lib
from cxrjax.train import gan_losses
from cxrjax.train import state as state_lib

MODELS = {
    "tiny": (pggan.GeneratorTiny, pggan.DiscriminatorTiny),
    "demo32": (pggan.GeneratorDemo32, pggan.DiscriminatorDemo32),
    "official1024": (pggan.GeneratorOfficial1024, pggan.DiscriminatorOfficial1024),
}
CONDITIONING = ("", "projection")  # "": AC-GAN (the official code)
RESET_CHOICES = ("phase", "resolution", "never")
DTYPES = state_lib.DTYPES
FADE, STABLE = "fade", "stable"


GANState = state_lib.GANState  # defined with the other train states


# ----------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Phase:
    index: int  # 0 = 4x4 stable, then (fade, stable) per further resolution
    resolution: int
    kind: str  # FADE or STABLE
    start: int  # images_seen at which the phase starts
    length: int  # images in the phase

    @property
    def end(self) -> int:
        return self.start + self.length


def phases(
    max_resolution: int, fade_images: int, stable_images: int, final_stable_images: int = 0
) -> list[Phase]:
    """All phases in order: 4 stable, 8 fade, 8 stable, ..., max fade, max stable.

    `final_stable_images` > 0 sets the length of the last phase (the official code's training
    at full resolution until `total_kimg`): the full-size phase is where quality is made.
    """
    out = [Phase(0, 4, STABLE, 0, stable_images)]
    for log2 in range(3, int(math.log2(max_resolution)) + 1):
        for kind, length in ((FADE, fade_images), (STABLE, stable_images)):
            out.append(Phase(len(out), 2**log2, kind, out[-1].end, length))
    if final_stable_images > 0:
        out[-1] = dataclasses.replace(out[-1], length=final_stable_images)
    return out


def schedule(
    images_seen: int, max_resolution: int, fade_images: int, stable_images: int
) -> tuple[Phase, float]:
    """(phase, alpha) at `images_seen` (host side; past the end: the last phase, alpha 1)."""
    all_phases = phases(max_resolution, fade_images, stable_images)
    phase = next((p for p in all_phases if images_seen < p.end), all_phases[-1])
    alpha = 1.0
    if phase.kind == FADE:
        alpha = min(max((images_seen - phase.start) / phase.length, 0.0), 1.0)
    return phase, alpha


def parse_batch_sizes(spec: str, default: int, max_resolution: int) -> dict[int, int]:
    """Global batch per resolution from "from_res:batch,..." (empty: `default` everywhere).

    "4:64,64:32,128:16" trains 4..32 px at 64, 64 px at 32 and 128 px and above at 16, as the
    official code shrinks the minibatch while growing. Resolutions below the first entry use
    `default`.
    """
    table = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            resolution, batch = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"batch sizes: {item!r} is not 'resolution:batch'") from None
        table[resolution] = batch
    sizes, current, resolution = {}, default, 4
    while resolution <= max_resolution:
        current = max(((r, b) for r, b in table.items() if r <= resolution), default=(0, current))[
            1
        ]
        sizes[resolution] = current
        resolution *= 2
    return sizes


def phase_end_steps(all_phases: Sequence[Phase], batch_sizes: Mapping[int, int]) -> list[int]:
    """Global step at which each phase ends, when every step at resolution r sees batch_sizes[r].

    A phase ends on its first step whose images reach `phase.end` (a batch never straddles
    two resolutions' steps; it may overshoot a boundary by less than one batch).
    """
    ends, step, seen = [], 0, 0
    for phase in all_phases:
        batch = batch_sizes[phase.resolution]
        if seen < phase.end:
            count = math.ceil((phase.end - seen) / batch)
            step, seen = step + count, seen + count * batch
        ends.append(step)
    return ends


def fade_start(resolution: int, fade_images: int, stable_images: int) -> int:
    """images_seen at which `resolution` (> 4) starts fading in."""
    log2 = int(math.log2(resolution))
    return stable_images + (log2 - 3) * (fade_images + stable_images)


def alpha_in_graph(images_seen, resolution: int, fade_images: int, stable_images: int):
    """Traced alpha for a static resolution: the same value `schedule` gives on the host."""
    if resolution <= 4:
        return jnp.float32(1.0)
    start = fade_start(resolution, fade_images, stable_images)
    seen = jnp.asarray(images_seen, jnp.float32)
    return jnp.clip((seen - start) / float(fade_images), 0.0, 1.0)


def _phase_index_in_graph(images_seen, resolution: int, fade_images: int, stable_images: int):
    """Index of the phase at `images_seen` among this resolution's (fade, stable), as int32."""
    start = fade_start(resolution, fade_images, stable_images) if resolution > 4 else 0
    return (jnp.asarray(images_seen) >= start + fade_images).astype(jnp.int32)


# ----------------------------------------------------------------------------- models
def make_models(model_config: Mapping[str, Any], num_classes: int, max_resolution: int):
    """(G, D) from the config: preset, conditional (AC-GAN) flag, minibatch-stddev group."""
    g_cls, d_cls = MODELS[model_config["name"]]
    k = num_classes if model_config["conditional"] else 0
    # bf16 compute, fp32 parameters; the losses and gradient penalty are computed in fp32.
    dtype = DTYPES[model_config.get("dtype", "float32")]
    generator = g_cls(max_resolution=max_resolution, num_classes=k, dtype=dtype)
    discriminator = d_cls(
        max_resolution=max_resolution,
        num_classes=k,
        mbstd_group_size=model_config["mbstd_group_size"],
        dtype=dtype,
    )
    return generator, discriminator


def make_optimizer(optim_config: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.adam(
        optim_config["lr"], b1=optim_config["b1"], b2=optim_config["b2"], eps=optim_config["eps"]
    )


def init_state(generator, discriminator, g_tx, d_tx, rng, *, num_channels: int = 1) -> GANState:
    """Parameters for every stage (the trees never change while growing), EMA = G."""
    g_key, d_key = jax.random.split(jax.random.fold_in(rng, 1))
    latents = jnp.zeros((1, generator.latent_dim), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if generator.num_classes else None
    g_params = generator.init(g_key, latents, labels, resolution=4)["params"]
    images = jnp.zeros((1, 4, 4, num_channels), jnp.float32)
    d_params = discriminator.init(d_key, images, resolution=4)["params"]
    return GANState(
        step=jnp.zeros((), jnp.int32),
        images_seen=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        g_ema_params=jax.tree.map(jnp.copy, g_params),
        g_opt_state=g_tx.init(g_params),
        d_opt_state=d_tx.init(d_params),
        rng=rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------- step
def make_train_step(
    generator,
    discriminator,
    txs: tuple[optax.GradientTransformation, optax.GradientTransformation],
    resolution: int,
    *,
    fade_images: int,
    stable_images: int,
    gp_weight: float = 10.0,
    drift_weight: float = 1e-3,
    cls_weight: float = 1.0,
    fake_cls_weight: float | None = None,
    diffaugment: str = "",
    conditioning: str = "",
    ema_decay: float = 0.999,
    reset_opt: str = "phase",
):
    """`train_step(state, batch, rng) -> (state, metrics)` at a static `resolution`.

    `batch["image"]`: reals [B, R, R, C] in [-1, 1] at the maximum resolution (box-downsampled
    here), `batch["label"]`: ints [B] (used when conditional). Alpha comes from
    `state.images_seen`; a NaN/Inf loss or gradient leaves G, D, EMA and optimizer states
    unchanged (counted in `nonfinite_steps`) while the counters advance.
    `fake_cls_weight` (None: `cls_weight`, the official AC-GAN) weights D's class loss on fakes;
    0 trains D's class head on real images only, so G cannot agree with D on a private code
    for the label and must make images a real-trained classifier assigns to their class.
    `diffaugment` ("translation,cutout", ...; "" = off): DiffAugment ops applied to every image
    D sees (reals, fakes, penalty interpolates), each call with its own draw.
    `conditioning` "" (AC-GAN: D's class logits trained by cross-entropy) or "projection"
    (Miyato & Koyama 2018: D's score for an image of class y adds the logit of y, a learned
    inner product of a class embedding with D's features, and no cross-entropy), so D judges
    how real an image is *as class y* and a fake of one class that looks like another loses.
    """
    if conditioning not in CONDITIONING:
        raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}")
    fake_cls_weight = cls_weight if fake_cls_weight is None else fake_cls_weight
    policy = diffaugment_lib.parse(diffaugment)
    if reset_opt not in RESET_CHOICES:
        raise ValueError(f"reset_opt must be one of {RESET_CHOICES}, got {reset_opt!r}")
    g_tx, d_tx = txs
    conditional = generator.num_classes > 0

    def train_step(state: GANState, batch, rng):
        alpha = alpha_in_graph(state.images_seen, resolution, fade_images, stable_images)
        labels = batch["label"].astype(jnp.int32) if conditional else None
        reals = pggan.resize_reals(batch["image"].astype(jnp.float32), resolution)
        if resolution > 4:
            reals = pggan.fade_in_reals(reals, alpha)
        batch_size = reals.shape[0]
        z_d_key, z_g_key, gp_key, aug_key = jax.random.split(rng, 4)
        z_d = jax.random.normal(z_d_key, (batch_size, generator.latent_dim), jnp.float32)
        z_g = jax.random.normal(z_g_key, (batch_size, generator.latent_dim), jnp.float32)

        # Optimizer-state reset at phase (or resolution) starts: a pure function of images_seen.
        g_opt_state, d_opt_state = state.g_opt_state, state.d_opt_state
        if reset_opt != "never":
            start = 0 if resolution == 4 else fade_start(resolution, fade_images, stable_images)
            boundaries = [start]
            if reset_opt == "phase" and resolution > 4:
                boundaries.append(start + fade_images)  # the stable phase's start
            # True on the first step at or after a boundary (which need not be a batch multiple).
            seen = state.images_seen
            reset = jnp.zeros((), jnp.bool_)
            for boundary in boundaries:
                reset = reset | ((seen >= boundary) & (seen - batch_size < boundary))
            g_opt_state = state_lib.select(reset, g_tx.init(state.g_params), g_opt_state)
            d_opt_state = state_lib.select(reset, d_tx.init(state.d_params), d_opt_state)

        def generate(g_params, latents):
            return generator.apply(
                {"params": g_params}, latents, labels, resolution=resolution, alpha=alpha
            )

        calls = iter(range(1 << 30))  # a fresh augmentation key per D call site (trace order)

        def d_apply_with(d_params):
            def d_apply(images, lab):
                if policy:
                    key = jax.random.fold_in(aug_key, next(calls))
                    images = diffaugment_lib.augment(images, key, policy)
                scores, logits = discriminator.apply(
                    {"params": d_params}, images, lab, resolution=resolution, alpha=alpha
                )
                if conditioning == "projection" and lab is not None:
                    own = jnp.take_along_axis(logits, lab[:, None], axis=-1)[:, 0]
                    return scores.reshape(own.shape) + own, logits[:, :0]
                return scores, logits

            return d_apply

        # D update.
        fakes = jax.lax.stop_gradient(generate(state.g_params, z_d))

        def d_loss_fn(d_params):
            return gan_losses.wgan_gp_d_loss(
                d_apply_with(d_params),
                reals,
                fakes,
                labels,
                gp_key,
                gp_weight=gp_weight,
                drift_weight=drift_weight,
                real_cls_weight=cls_weight,
                fake_cls_weight=fake_cls_weight,
            )

        (d_loss, d_metrics), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params)
        d_updates, d_opt_state = d_tx.update(d_grads, d_opt_state, state.d_params)
        d_params = optax.apply_updates(state.d_params, d_updates)

        # G update against the updated D.
        def g_loss_fn(g_params):
            return gan_losses.wgan_g_loss(
                d_apply_with(d_params), generate(g_params, z_g), labels, cls_weight=cls_weight
            )

        (g_loss, g_metrics), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
        g_updates, g_opt_state = g_tx.update(g_grads, g_opt_state, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        # EMA with warm-up (as the DDPM's): min(decay, (1 + step) / (10 + step)), so a short run's
        # average follows the trained weights instead of keeping most of the initial ones.
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        g_ema = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.g_ema_params, g_params
        )

        d_grad_norm, g_grad_norm = optax.tree.norm(d_grads), optax.tree.norm(g_grads)
        finite = state_lib.is_finite(d_loss, g_loss, d_grad_norm, g_grad_norm)
        counters = dict(step=state.step + 1, images_seen=state.images_seen + jnp.int32(batch_size))
        updated = state.replace(
            g_params=g_params,
            d_params=d_params,
            g_ema_params=g_ema,
            g_opt_state=g_opt_state,
            d_opt_state=d_opt_state,
            **counters,
        )
        kept = state.replace(nonfinite_steps=state.nonfinite_steps + 1, **counters)
        new_state = state_lib.select(finite, updated, kept)
        metrics = {
            **{f"d/{k}": v for k, v in d_metrics.items()},
            **{f"g/{k}": v for k, v in g_metrics.items()},
            "d/param_grad_norm": d_grad_norm,
            "g/param_grad_norm": g_grad_norm,
            "alpha": alpha,
            "resolution": jnp.float32(resolution),
            "images_seen": new_state.images_seen.astype(jnp.float32),
            "nonfinite_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    return train_step


class CompiledSteps:
    """Compiled train steps keyed by resolution (static), built on first use and cached.

    `len(steps.cache)` counts compiled resolutions: alpha is traced, so fade and stable phases of
    one resolution share one entry and one XLA compile.
    """

    def __init__(self, make_step, mesh, abstract_state):
        self._make_step = make_step
        replicated = parallel.replicated(mesh)
        self._shardings = dict(
            in_shardings=(
                jax.tree.map(lambda _: replicated, abstract_state),
                parallel.data_sharding(mesh),
                replicated,
            ),
            out_shardings=(jax.tree.map(lambda _: replicated, abstract_state), replicated),
            donate_argnums=0,
        )
        self.cache: dict[int, Any] = {}

    def __call__(self, resolution: int):
        if resolution not in self.cache:
            self.cache[resolution] = jax.jit(
                self._make_step(resolution),
                **self._shardings,
                compiler_options=parallel.cpu_compiler_options(),
            )
        return self.cache[resolution]


def make_sample_fn(generator):
    """`sample(g_params, latents, labels, alpha, *, resolution)` -> images in [-1, 1] (jitted)."""

    def sample(g_params, latents, labels, alpha, resolution):
        labels = labels if generator.num_classes else None
        return generator.apply(
            {"params": g_params}, latents, labels, resolution=resolution, alpha=alpha
        )

    return jax.jit(
        sample, static_argnames="resolution", compiler_options=parallel.cpu_compiler_options()
    )


def film_resolution(config) -> int:
    """The size of the films the run learns and its samples are cropped to (see
    `data.content_resolution`; runs from before that field: the canvas, data.resolution)."""
    return int(config.data.get("content_resolution", 0) or config.data.resolution)
