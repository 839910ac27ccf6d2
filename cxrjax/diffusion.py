"""DDPM / DDIM math as pure functions: schedules, forward noising, posterior, losses, samplers.

Nothing here knows about Flax modules. Networks enter through two callables:

  apply_fn(params, x_t, t, labels, rng) -> prediction   (training mode; rng drives dropout)
  model_fn(x_t, t, labels) -> prediction                 (eval mode, params already bound)

`cxrjax.models.unet.make_apply_fn` / `make_model_fn` build them for the UNet. A prediction is the
noise eps or the velocity v (Salimans & Ho 2022), chosen by `prediction="eps" | "v"`.

Time convention (as in Ho et al.'s code): integer index t in [0, T) stands for the paper's step
t + 1, so `alphas_cumprod[t]` is alpha-bar_{t+1}; index 0 is the least noisy step, and the
previous step of index 0 is clean data (alpha-bar = 1). x is in [-1, 1], any shape [B, ...].

Classifier-free guidance (Ho & Salimans 2021) uses the convention
    eps_guided = (1 + w) * eps(x, t, c) - w * eps(x, t, null),
so w = 0 is the plain conditional model and w > 0 pushes samples towards the class.

All samplers are `lax.scan` loops, so a sampler called under `jax.jit` is one compiled program:
jit a function of (params, rng, labels) that builds `model_fn` inside, so new params or keys reuse
the compiled sampler (`steps`, `t_star`, shapes and the sampler kind are the static parts).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
ApplyFn = Callable[..., jax.Array]


@struct.dataclass
class Schedule:
    """Every per-timestep coefficient the math needs, float32 arrays of shape [T].

    A pytree, so it can be passed into jitted functions; T is read from the array shape and is
    therefore static under jit.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array  # alpha-bar of the previous step; 1 before index 0
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array  # beta-tilde; exactly 0 at index 0
    posterior_log_variance_clipped: jax.Array  # log beta-tilde with index 0 copied from index 1
    posterior_mean_coef1: jax.Array  # multiplies x_0
    posterior_mean_coef2: jax.Array  # multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """Derive all coefficients in float64 numpy, then store float32 (small ᾱ lose digits in f32)."""
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must be a 1-D array in (0, 1]")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # Index 0 has zero variance; copy index 1 so the log stays finite (Ho et al. do the same).
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )
    return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Ho et al.'s linear betas from beta_start to beta_end (not rescaled for T != 1000)."""
    return schedule_from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    """f(u)/f(0) with f(u) = cos^2(pi/2 (u + s)/(1 + s)), u = t/T in [0, 1] (Nichol & Dhariwal)."""
    f = lambda v: np.cos((v + s) / (1 + s) * np.pi / 2) ** 2
    return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Betas giving ᾱ_t = f(t)/f(0); clipped at max_beta because β -> 1 as ᾱ -> 0 at t = T."""
    ab = cosine_alpha_bar(np.arange(T + 1) / T, s)
    return schedule_from_betas(np.minimum(1.0 - ab[1:] / ab[:-1], max_beta))


def _take(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """coef[t] for t [B], reshaped to [B, 1, ..., 1] to broadcast against a rank-`ndim` x."""
    t = jnp.asarray(t)
    return coef[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) with the given standard noise."""
    return (
        _take(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + _take(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_posterior(
    schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean [B, ...], variance and clipped log-variance [B, 1, ...] of q(x_{t-1} | x_t, x_0)."""
    mean = (
        _take(schedule.posterior_mean_coef1, t, xt.ndim) * x0
        + _take(schedule.posterior_mean_coef2, t, xt.ndim) * xt
    )
    return (
        mean,
        _take(schedule.posterior_variance, t, xt.ndim),
        _take(schedule.posterior_log_variance_clipped, t, xt.ndim),
    )


def predict_x0_from_eps(
    schedule: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """Invert q_sample: x_0 = (x_t - sqrt(1 - ᾱ) eps) / sqrt(ᾱ)."""
    return (
        _take(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
        - _take(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps
    )


def predict_eps_from_x0(
    schedule: Schedule, xt: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
    """The noise that maps x_0 to x_t: eps = (x_t - sqrt(ᾱ) x_0) / sqrt(1 - ᾱ)."""
    return (_take(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0) / _take(
        schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim
    )


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Velocity v = sqrt(ᾱ) eps - sqrt(1 - ᾱ) x_0, the v-prediction regression target."""
    return (
        _take(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
        - _take(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def eps_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(ᾱ) v + sqrt(1 - ᾱ) x_t (rotate back; (sqrt ᾱ, sqrt(1-ᾱ)) is a unit vector)."""
    return (
        _take(schedule.sqrt_alphas_cumprod, t, xt.ndim) * v
        + _take(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
    )


def x0_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v; unlike the eps route, stable at high noise."""
    return (
        _take(schedule.sqrt_alphas_cumprod, t, xt.ndim) * xt
        - _take(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v
    )


def prediction_to_x0_eps(
    schedule: Schedule, xt: jax.Array, t: jax.Array, out: jax.Array, prediction: str, clip_x0: bool
) -> tuple[jax.Array, jax.Array]:
    """Turn a network output into (x_0, eps); with clipping, eps is recomputed from clipped x_0."""
    if prediction == "eps":
        x0 = predict_x0_from_eps(schedule, xt, t, out)
        eps = out
    elif prediction == "v":
        x0 = x0_from_v(schedule, xt, t, out)
        eps = eps_from_v(schedule, xt, t, out)
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = predict_eps_from_x0(schedule, xt, t, x0)
    return x0, eps


def drop_labels(rng: jax.Array, labels: jax.Array, p: float | jax.Array, null_id: int) -> jax.Array:
    """Replace each label by `null_id` with probability p (classifier-free guidance training)."""
    drop = jax.random.bernoulli(rng, p, labels.shape)
    return jnp.where(drop, jnp.asarray(null_id, labels.dtype), labels)


def diffusion_loss(
    apply_fn: ApplyFn,
    params,
    schedule: Schedule,
    x0: jax.Array,
    labels: jax.Array | None,
    rng: jax.Array,
    prediction: str = "eps",
    label_dropout: float | jax.Array = 0.0,
    null_id: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Ho et al.'s "simple" loss: MSE between the network output and the eps (or v) target.

    t is uniform over [0, T), one per example. Labels are dropped to `null_id` with probability
    `label_dropout` when `null_id` is given. Returns (loss, metrics); metrics add the loss in each
    quarter of [0, T) (NaN-free: an empty quarter reports 0) since the total hides which noise
    levels are learnt. Pure and jit-friendly; differentiate w.r.t. `params`.
    """
    if null_id is None and isinstance(label_dropout, float | int) and label_dropout > 0:
        raise ValueError("label_dropout > 0 needs the model's null_id")
    t_rng, noise_rng, drop_rng, model_rng = jax.random.split(rng, 4)
    batch = x0.shape[0]
    T = schedule.num_timesteps
    t = jax.random.randint(t_rng, (batch,), 0, T)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    xt = q_sample(schedule, x0, t, noise)
    if labels is not None and null_id is not None:
        labels = drop_labels(drop_rng, labels, label_dropout, null_id)
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = v_target(schedule, x0, t, noise)
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    out = apply_fn(params, xt, t, labels, model_rng)
    per_example = jnp.mean(
        jnp.square(out.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim))
    )  # [B]
    loss = jnp.mean(per_example)
    metrics = {"loss": loss}
    quarter = (4 * t) // T
    for q in range(4):
        mask = quarter == q
        metrics[f"loss_t_q{q}"] = jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(
            jnp.sum(mask), 1
        )
    return loss, metrics


def guided_model_fn(model_fn: ModelFn, guidance_scale: float | jax.Array, null_id: int) -> ModelFn:
    """Classifier-free guidance: (1 + w) f(x, t, c) - w f(x, t, null), one doubled-batch call.

    Linear in the output, so it serves eps- and v-prediction models alike.
    """

    def fn(x, t, labels):
        if labels is None:
            raise ValueError("guidance needs class labels")
        b = x.shape[0]
        out = model_fn(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, jnp.full_like(labels, null_id)]),
        )
        cond, uncond = out[:b], out[b:]
        return cond + guidance_scale * (cond - uncond)

    return fn


def ddim_timesteps(start: int, steps: int) -> np.ndarray:
    """`steps` decreasing indices from `start` down, evenly spaced ("trailing" spacing).

    The first step is always `start` (for sampling, T - 1: the pure-noise end), so even S = 1
    denoises from full noise, unlike the leading spacing 0, T/S, ... of the DDIM paper.
    """
    n = start + 1
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    return (n - (np.arange(steps) * n) // steps - 1).astype(np.int32)


def _maybe_guided(model_fn, guidance_scale, null_id):
    if guidance_scale is None:
        return model_fn
    if null_id is None:
        raise ValueError("guidance needs null_id")
    return guided_model_fn(model_fn, guidance_scale, null_id)


def _sample_loop(step_fn, x_t: jax.Array, ts: np.ndarray, rng: jax.Array) -> jax.Array:
    """Scan `step_fn(x, (t, t_prev, key)) -> x` over consecutive pairs of `ts` then -1 (clean)."""
    ts = jnp.asarray(ts, jnp.int32)  # traced or concrete: one compile per length, not per value
    t_prev = jnp.append(ts[1:], -1).astype(jnp.int32)
    keys = jax.random.split(rng, len(ts))
    x, _ = jax.lax.scan(lambda x, xs: (step_fn(x, xs), None), x_t, (ts, t_prev, keys))
    return x


def _ddpm_loop(model_fn, schedule, x_t, start, rng, labels, prediction, clip_x0, variance):
    if variance == "small":  # beta-tilde: right for a deterministic x_0 (Ho et al.'s CIFAR choice)
        log_var_table = schedule.posterior_log_variance_clipped
    elif variance == "large":  # beta_t: right for x_0 ~ N(0, I); index 0 keeps beta-tilde_1
        log_var_table = jnp.log(jnp.append(schedule.posterior_variance[1], schedule.betas[1:]))
    else:
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")

    def step(x, xs):
        t, _, key = xs
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        x0, _ = prediction_to_x0_eps(schedule, x, tb, model_fn(x, tb, labels), prediction, clip_x0)
        mean, _, _ = q_posterior(schedule, x0, x, tb)
        noise = jax.random.normal(key, x.shape, x.dtype)
        # No noise on the last step: x_0 is the posterior mean itself.
        return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var_table[t]), 0.0) * noise

    return _sample_loop(step, x_t, np.arange(start, -1, -1, dtype=np.int32), rng)


def ddim_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    rng: jax.Array,
    labels: jax.Array | None = None,
    *,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update from index t to t_prev (-1: the clean end): (x_{t_prev}, x0 estimate).

    The samplers scan it; `eta` may differ per step (a traced value), as in benchmarks/ddim_eta.
    """
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    x0, eps = prediction_to_x0_eps(schedule, x, tb, model_fn(x, tb, labels), prediction, clip_x0)
    ab = schedule.alphas_cumprod[t]
    ab_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    # DDIM eq. 16: eta = 1 gives the DDPM posterior variance, eta = 0 a deterministic map.
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    dir_xt = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps
    noise = jax.random.normal(rng, x.shape, x.dtype)
    return jnp.sqrt(ab_prev) * x0 + dir_xt + sigma * noise, x0


def _ddim_loop(model_fn, schedule, x_t, ts, rng, labels, **step_options):
    def step(x, xs):
        t, t_prev, key = xs
        return ddim_step(model_fn, schedule, x, t, t_prev, key, labels, **step_options)[0]

    return _sample_loop(step, x_t, ts, rng)


def _start(rng: jax.Array, shape: tuple[int, ...], x_T: jax.Array | None):
    """(x_T ~ N(0, I) unless given, the sampling loop's key)."""
    noise_rng, loop_rng = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(noise_rng, shape, jnp.float32)
    return x_T, loop_rng


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    labels: jax.Array | None = None,
    *,
    prediction: str = "eps",
    guidance_scale: float | jax.Array | None = None,
    null_id: int | None = None,
    clip_x0: bool = True,
    variance: str = "small",
    x_T: jax.Array | None = None,
) -> jax.Array:
    """Ancestral sampling over all T steps from x_T ~ N(0, I) (or the given x_T) to x_0.

    guidance_scale None skips the unconditional pass; a value (may be traced) applies CFG.
    """
    x_T, loop_rng = _start(rng, shape, x_T)
    model_fn = _maybe_guided(model_fn, guidance_scale, null_id)
    start = schedule.num_timesteps - 1
    return _ddpm_loop(
        model_fn, schedule, x_T, start, loop_rng, labels, prediction, clip_x0, variance
    )


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    labels: jax.Array | None = None,
    *,
    steps: int = 50,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    guidance_scale: float | jax.Array | None = None,
    null_id: int | None = None,
    clip_x0: bool = True,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """DDIM (Song et al. 2021) with `steps` (static) steps; eta = 0 is deterministic given x_T."""
    x_T, loop_rng = _start(rng, shape, x_T)
    model_fn = _maybe_guided(model_fn, guidance_scale, null_id)
    ts = ddim_timesteps(schedule.num_timesteps - 1, steps)
    return _ddim_loop(
        model_fn,
        schedule,
        x_T,
        ts,
        loop_rng,
        labels,
        eta=eta,
        prediction=prediction,
        clip_x0=clip_x0,
    )


def reconstruct(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    t_star: int,
    rng: jax.Array,
    sampler: str = "ddim",
    steps: int | None = None,
    labels: jax.Array | None = None,
    *,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    guidance_scale: float | jax.Array | None = None,
    null_id: int | None = None,
    clip_x0: bool = True,
    variance: str = "small",
    timesteps: jax.Array | None = None,
) -> jax.Array:
    """Partial diffusion for anomaly scoring: noise x_0 to index t_star, then denoise back.

    A model trained on normal images pulls the noised image back towards normal anatomy, so the
    difference to the input highlights what it cannot explain. `t_star` (static) sets how much is
    destroyed; `steps` (static, DDIM only, default t_star + 1) how many denoising steps are used.
    `timesteps` (DDIM only): the descending indices to visit instead, `ddim_timesteps(t_star,
    steps)`; then `t_star` may be traced, so one compiled scorer serves every t*.
    """
    noise_rng, loop_rng = jax.random.split(rng)
    t = jnp.full((x0.shape[0],), t_star, jnp.int32)
    x_t = q_sample(schedule, x0, t, jax.random.normal(noise_rng, x0.shape, x0.dtype))
    model_fn = _maybe_guided(model_fn, guidance_scale, null_id)
    if sampler == "ddim":
        ts = ddim_timesteps(t_star, steps or t_star + 1) if timesteps is None else timesteps
        return _ddim_loop(
            model_fn,
            schedule,
            x_t,
            ts,
            loop_rng,
            labels,
            eta=eta,
            prediction=prediction,
            clip_x0=clip_x0,
        )
    if sampler == "ddpm":
        if timesteps is not None:
            raise ValueError("timesteps apply to the DDIM sampler only")
        return _ddpm_loop(
            model_fn, schedule, x_t, t_star, loop_rng, labels, prediction, clip_x0, variance
        )
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")


def reconstruction_error(x0: jax.Array, x_rec: jax.Array, metric: str = "mse") -> jax.Array:
    """Per-image anomaly score [B]: mean squared ('mse') or absolute ('l1') difference."""
    diff = x0.astype(jnp.float32) - x_rec.astype(jnp.float32)
    if metric == "mse":
        per_pixel = jnp.square(diff)
    elif metric == "l1":
        per_pixel = jnp.abs(diff)
    else:
        raise ValueError(f"metric must be 'mse' or 'l1', got {metric!r}")
    return jnp.mean(per_pixel, axis=tuple(range(1, x0.ndim)))
