"""The profiler behind results.json "profile": exclusive sections, JAX compiles apart."""

import time

import jax
import jax.numpy as jnp

from cxrjax import timing


def test_sections_are_exclusive_and_the_rest_is_the_remainder():
    timer = timing.Timer()
    start = time.perf_counter()
    with timer.section("outer"):
        time.sleep(0.05)
        with timer.section("inner"):
            time.sleep(0.1)
    time.sleep(0.02)
    summary = timer.summary(time.perf_counter() - start)
    assert 0.09 <= summary["inner"] < 0.2
    assert 0.04 <= summary["outer"] < 0.1  # its inner section's 0.1 s is not in it
    assert 0.015 <= summary["rest"] < 0.06
    assert abs(summary["outer"] + summary["inner"] + summary["rest"] - summary["total"]) < 0.02


def test_scopes_prefix_names_and_summary_selects_one():
    timer = timing.Timer()
    with timer.scope("stage1"), timer.section("data"):
        time.sleep(0.01)
    with timer.scope("stage2"), timer.section("data"):
        pass
    assert set(timer.seconds) == {"stage1/data", "stage2/data"}
    assert set(timer.summary(1.0, prefix="stage1/")) == {"data", "rest", "total"}


def test_jax_compiles_move_out_of_the_section_they_happen_in():
    timer = timing.Timer()

    def f(x):
        for _ in range(20):
            x = jnp.sin(x) @ x
        return x

    with timer.compiles(), timer.section("eval"):
        start = time.perf_counter()
        jax.jit(f)(jnp.ones((32, 32))).block_until_ready()
        wall = time.perf_counter() - start
    summary = timer.summary()
    assert summary["compile"] > 0 and summary["trace"] > 0
    assert summary["eval"] >= 0 and summary["eval"] < wall - summary["compile"] + 1e-3
    assert abs(summary["eval"] + summary["compile"] + summary["trace"] - wall) < 0.01
    # Closed: later compiles are not counted.
    compiled = summary["compile"]
    jax.jit(lambda x: x * 3)(jnp.ones(3)).block_until_ready()
    assert timer.summary()["compile"] == compiled
