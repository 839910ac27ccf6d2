"""Optimizers and schedules from config: every name builds, schedules match their definitions."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.train import optim

BASE = dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_every_optimizer_and_schedule_descends_a_quadratic(name, schedule):
    tx, _ = optim.make_optimizer(dict(BASE, name=name, schedule=schedule, grad_clip_norm=5.0), 100)
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    for _ in range(40):
        loss = jnp.sum(params["w"] ** 2)
        grads = {"w": 2 * params["w"]}
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    assert float(jnp.sum(params["w"] ** 2)) < 13.0


def test_warmup_cosine_schedule_values():
    schedule = optim.make_schedule(BASE, 110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.5e-2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1e-2, rtol=1e-6)
    # Cosine from peak to final over the remaining 100 steps; halfway = mean of the two.
    np.testing.assert_allclose(schedule(60), (1e-2 + 1e-3) / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(110), 1e-3, rtol=1e-5)


def test_plateau_scales_updates_down_when_the_loss_stalls():
    config = dict(
        BASE,
        name="sgd",
        schedule="plateau",
        warmup_steps=0,
        momentum=0.0,
        plateau_factor=0.5,
        plateau_patience=2,
        plateau_window=1,
    )
    tx, _ = optim.make_optimizer(config, 100)
    params = {"w": jnp.array([1.0])}
    state = tx.init(params)
    sizes = []
    for _ in range(8):
        updates, state = tx.update({"w": jnp.array([1.0])}, state, params, value=jnp.asarray(1.0))
        sizes.append(abs(float(updates["w"][0])))
    assert sizes[0] == pytest.approx(1e-2)
    assert sizes[-1] < sizes[0] / 3  # halved at least twice after patience ran out


def test_bad_optimizer_fields_are_named():
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(dict(BASE, name="lion"), 10)
    with pytest.raises(ValueError, match="optim.lr"):
        optim.make_optimizer(dict(BASE, lr=0.0), 10)


def test_ema_update_is_the_exponential_average():
    ema = {"w": jnp.array([0.0, 10.0])}
    params = {"w": jnp.array([1.0, 0.0])}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["w"], [0.1, 9.0], rtol=1e-6)
