"""A toy trainer on the shared machinery, for fault tests that need a real process.

It is the smallest run that goes through everything a real trainer shares: the Grain pipeline
(PNG records, shuffle, augmentation, process slices), `parallel` (mesh, jax.distributed),
`checkpoint.restore_or_init` / `Checkpointer` and `loop.run`. The model is a logistic
regression on 8x8 images, so a process starts, compiles and trains in a few seconds.

Faults are injected from the command line (`python tests/faults/toy_trainer.py --help`):
a SIGKILL or an I/O error at the moment a given step's checkpoint would be committed, a signal
sent to itself before a given step, a NaN loss at a given step, truncated PNG records.
In-process tests call `train(...)` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

if __name__ == "__main__":  # Before jax is imported: fake devices for a standalone process.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.data import imageio, pipeline, sources
from cxrjax.metrics import writer as writer_lib
from cxrjax.train import loop
from cxrjax.train import state as state_lib

SPEC = sources.DatasetSpec("toy", ("a", "b"), resolution=8)
NUM_RECORDS = 64


@struct.dataclass
class ToyState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    nonfinite_steps: jax.Array


def make_records(corrupt: tuple[int, ...] = ()) -> list[dict]:
    """64 PNG records (labels alternate); those at `corrupt` are truncated mid-file."""
    images = np.random.default_rng(0).integers(0, 256, (NUM_RECORDS, 8, 8), np.uint8)
    records = []
    for i, image in enumerate(images):
        png = imageio.encode_png(image)
        if i in corrupt:
            png = png[: len(png) // 2]
        records.append({"image": png, "label": i % 2, "id": f"toy-{i:03d}.png"})
    return records


def init_state(tx, rng) -> ToyState:
    params = {"w": jnp.zeros((64, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    return ToyState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def make_train_step(tx, poison_step: int, skip_nonfinite: bool = True):
    """Masked softmax cross-entropy with random input dropout; non-finite updates skipped.

    `poison_step` > 0 turns that step's loss into NaN (in the graph, like a real blow-up);
    `skip_nonfinite=False` applies such an update anyway (a step without the in-graph guard).
    """

    def train_step(state: ToyState, batch, rng):
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        x = x * jax.random.bernoulli(rng, 0.9, x.shape)
        mask = batch.get("mask", jnp.ones(x.shape[:1], bool)).astype(jnp.float32)

        def loss_of(params):
            logits = x @ params["w"] + params["b"]
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
            poison = jnp.where(state.step + 1 == poison_step, jnp.nan, 1.0)
            return loss * poison

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = state_lib.is_finite(loss, grad_norm)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        kept = state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)
        if skip_nonfinite:
            new = state_lib.select(finite, new, kept)
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite_steps": new.nonfinite_steps}
        return new, metrics

    return train_step


def train(
    workdir: str,
    *,
    num_steps: int = 12,
    stop_at: int | None = None,
    checkpoint_every: int = 4,
    log_every: int = 2,
    global_batch_size: int = 8,
    num_devices: int | None = None,
    nonfinite: str = "skip",
    poison_step: int = 0,
    skip_nonfinite: bool = True,
    corrupt: tuple[int, ...] = (),
    bad_records: str = "error",
    max_bad_fraction: float = 0.01,
    signal_at: int = 0,
    signal_name: str = "SIGTERM",
    seed: int = 0,
) -> dict:
    """Trains the toy model; returns {"step", "preempted", "losses", "params"} (host arrays)."""
    devices = jax.devices()[:num_devices] if num_devices else None
    mesh = parallel.make_mesh(devices)
    parallel.check_global_batch(global_batch_size, mesh)
    tx = optax.adam(0.05)
    rng = jax.random.PRNGKey(seed)
    replicated = parallel.replicated(mesh)
    abstract = jax.eval_shape(lambda r: init_state(tx, r), rng)
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    step_fn = jax.jit(
        make_train_step(tx, poison_step, skip_nonfinite),
        in_shardings=(state_sharding, parallel.data_sharding(mesh), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    calls = {"n": 0}

    def train_step(state, batch, step_rng):
        calls["n"] += 1
        if signal_at and calls["n"] == signal_at - start_step and jax.process_index() == 0:
            # A real signal to this process while step `signal_at` runs (like a scheduler's).
            os.kill(os.getpid(), getattr(signal, signal_name))
        return step_fn(state, batch, step_rng)

    batches = pipeline.make_train_iterator(
        make_records(corrupt),
        SPEC,
        global_batch_size=global_batch_size,
        seed=seed,
        normalization="unit",
        bad_records=bad_records,
        device_count=mesh.devices.size,
    )
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
    signature = {"global_batch_size": global_batch_size, "seed": seed}
    state, start_step = checkpoint_lib.restore_or_init(
        checkpointer,
        checkpoint_lib.abstract_like(abstract, replicated),
        lambda: jax.jit(lambda r: init_state(tx, r), out_shardings=replicated)(rng),
        batches,
        signature,
    )
    writer = writer_lib.MetricWriter(workdir, enabled=parallel.is_main_process(), tensorboard=False)
    try:
        outcome = loop.run(
            state=state,
            train_step=train_step,
            batches=batches,
            mesh=mesh,
            rng=parallel.replicate(np.asarray(jax.device_get(state.rng)), mesh),
            start_step=start_step,
            num_steps=num_steps,
            images_per_step=global_batch_size,
            checkpointer=checkpointer,
            writer=writer,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            metadata={"signature": signature},
            nonfinite=nonfinite,
            stop_at=stop_at,
            max_bad_fraction=max_bad_fraction,
        )
    finally:
        writer.close()
        checkpointer.close()
    return {
        "step": outcome.step,
        "start_step": start_step,
        "preempted": outcome.preempted,
        "losses": {int(h["step"]): h["train/loss"] for h in outcome.history},
        "params": parallel.to_host(outcome.state.params),
    }


def read_losses(workdir: str) -> dict[int, float]:
    """Every logged train loss by step, over all sessions of a workdir."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}


def _inject_commit_fault(step: int, kind: str) -> None:
    """At the moment step `step` would be committed (tmp dir renamed), SIGKILL or fail."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device (injected)", str(self.get_final()))
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, default=12)
    parser.add_argument("--checkpoint_every", type=int, default=4)
    parser.add_argument("--log_every", type=int, default=2)
    parser.add_argument("--stop_at", type=int, default=None)
    parser.add_argument("--kill_at_commit", type=int, default=0, help="SIGKILL committing step")
    parser.add_argument("--fail_at_commit", type=int, default=0, help="I/O error committing step")
    parser.add_argument("--signal_at", type=int, default=0, help="signal self during this step")
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)
    parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.kill_at_commit:
        _inject_commit_fault(args.kill_at_commit, "kill")
    if args.fail_at_commit:
        _inject_commit_fault(args.fail_at_commit, "fail")
    from launch import common  # The real entry points' error handling and exit codes.

    def job():
        result = train(
            args.workdir,
            num_steps=args.num_steps,
            stop_at=args.stop_at,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            signal_at=args.signal_at,
            signal_name=args.signal,
        )
        if parallel.is_main_process():
            np.savez(os.path.join(args.workdir, "params.npz"), **result["params"])
        summary = {k: result[k] for k in ("step", "start_step", "preempted")}
        print("RESULT " + json.dumps(summary), flush=True)
        return {**summary, "finished": result["step"] == args.num_steps}

    common.run_job(job, lambda results: {"step": results["step"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
