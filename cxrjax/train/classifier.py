"""DenseNet classifier: model from config, losses, and the pure jitted steps.

`train_step(state, batch, rng) -> (state, metrics)` is pure and written for one device; it is
compiled once with the batch sharded over the mesh's "data" axis and the state replicated
(see `cxrjax.parallel`), which makes it data-parallel over every device of every process with
global-batch semantics independent of the device count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax import config as config_lib
from cxrjax import parallel
from cxrjax.data import sources
from cxrjax.models import densenet
from cxrjax.train import optim
from cxrjax.train import state as state_lib

DTYPES = state_lib.DTYPES
MODEL_FIELDS = densenet.FIELDS


# ----------------------------------------------------------------------------- model & loss
def make_model(model_config: Mapping[str, Any], num_classes: int) -> densenet.DenseNet:
    """A DenseNet from the config's explicit fields (presets fill them from the model class)."""
    kwargs = {name: model_config[name] for name in MODEL_FIELDS}
    kwargs["block_config"] = tuple(kwargs["block_config"])
    return densenet.DenseNet(num_classes=num_classes, dtype=DTYPES[model_config["dtype"]], **kwargs)


WEIGHTINGS = ("none", "balanced", "chexnet")


def class_weights(spec: sources.DatasetSpec, labels: np.ndarray, mode: str) -> np.ndarray:
    """Per-class loss weights from the training labels.

    `none`: ones. Multi-class `balanced` = N / (C * N_c); multi-label `balanced` = N_neg / N_pos
    per finding (a positive weight; large for rare findings: Hernia ~ 500 on NIH).
    `chexnet` (Rajpurkar et al. 2017, eq. 1): multi-label [2, C], positive terms weighted by
    w+ = N_neg / N and negative terms by w- = N_pos / N, per finding (both in [0, 1]);
    multi-class [C], the true class's weight 1 - N_c / N (the binary case of the same rule).
    """
    num = spec.num_classes
    if mode not in WEIGHTINGS:
        raise config_lib.ConfigError(
            f"config.loss.class_weighting: must be one of {WEIGHTINGS}, got {mode!r}"
        )
    if mode == "none":
        return np.ones(num, np.float32)
    if spec.label_kind == sources.MULTILABEL:
        positives = np.asarray(labels, np.float64).sum(axis=0)
        negatives = len(labels) - positives
        if mode == "chexnet":
            total = max(len(labels), 1)
            return np.stack([negatives / total, positives / total]).astype(np.float32)
        return (negatives / np.maximum(positives, 1.0)).astype(np.float32)
    counts = np.bincount(np.asarray(labels, np.int64).reshape(-1), minlength=num).astype(np.float64)
    if mode == "chexnet":
        return (1.0 - counts / max(counts.sum(), 1.0)).astype(np.float32)
    return (counts.sum() / (num * np.maximum(counts, 1.0))).astype(np.float32)


def make_loss_fn(
    spec: sources.DatasetSpec, weights: np.ndarray, label_smoothing: float = 0.0
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`loss(logits, labels, mask) -> scalar`, averaged over unmasked examples.

    Multi-class: softmax cross-entropy on (optionally smoothed) one-hot labels, weighted by the
    true class's weight. Multi-label: per-finding sigmoid cross-entropy with positive terms
    weighted by `weights` [C] (pos_weight), or positive terms by `weights[0]` and negative
    terms by `weights[1]` when `weights` is [2, C] (CheXNet); smoothing toward 0.5.
    """
    class_weight = jnp.asarray(weights, jnp.float32)
    if class_weight.ndim == 2:
        class_weight, negative_weight = class_weight[0], class_weight[1]
    else:
        negative_weight = jnp.ones_like(class_weight)
    multilabel = spec.label_kind == sources.MULTILABEL
    num_classes = spec.num_classes

    def loss_fn(logits, labels, mask):
        logits = logits.astype(jnp.float32)
        if multilabel:
            targets = labels.astype(jnp.float32)
            if label_smoothing:
                targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
            per_class = -(
                class_weight * targets * jax.nn.log_sigmoid(logits)
                + negative_weight * (1.0 - targets) * jax.nn.log_sigmoid(-logits)
            )
            per_example = per_class.mean(axis=-1)
        else:
            one_hot = jax.nn.one_hot(labels, num_classes)
            targets = optax.smooth_labels(one_hot, label_smoothing) if label_smoothing else one_hot
            per_example = optax.softmax_cross_entropy(logits, targets) * class_weight[labels]
        mask = mask.astype(jnp.float32)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


def loss_from_probs(
    spec: sources.DatasetSpec, weights: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> float:
    """The training loss (same weights, no smoothing) of predicted probabilities, on the host:
    the validation loss that the val_plateau schedule watches."""
    probs = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    weights = np.asarray(weights, np.float64)
    if spec.label_kind == sources.MULTILABEL:
        positive, negative = (weights[0], weights[1]) if weights.ndim == 2 else (weights, 1.0)
        targets = np.asarray(labels, np.float64)
        per_class = -(
            positive * targets * np.log(probs) + negative * (1 - targets) * np.log(1 - probs)
        )
        return float(per_class.mean())
    labels = np.asarray(labels, np.int64)
    picked = probs[np.arange(len(labels)), labels]
    return float(np.mean(-np.log(picked) * weights[labels]))


# ----------------------------------------------------------------------------- state & steps
def init_state(
    model: densenet.DenseNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    *,
    use_ema: bool,
    variables: Mapping[str, Any] | None = None,
) -> state_lib.ClassifierState:
    """Initial state; `variables` (e.g. converted torchvision weights) replace the random init."""
    init_rng, run_rng = jax.random.split(rng)
    if variables is None:
        variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return state_lib.ClassifierState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=run_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def make_train_step(
    model: densenet.DenseNet,
    tx: optax.GradientTransformationExtraArgs,
    loss_fn: Callable,
    schedule: optax.Schedule,
    *,
    ema_decay: float = 0.0,
):
    """The pure step: forward/backward, optimizer, batch stats, EMA; non-finite updates skipped.

    A NaN/Inf loss or gradient leaves the whole state unchanged (counted in
    `nonfinite_steps`), so a non-finite state can never be checkpointed.
    """

    def train_step(state: state_lib.ClassifierState, batch, rng):
        mask = batch.get("mask", jnp.ones(batch["image"].shape[:1], jnp.bool_))

        def loss_of(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            return loss_fn(logits, batch["label"], mask), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            # Warm-up (as in TF's ExponentialMovingAverage): early averages follow the params.
            decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
            ema = optim.ema_update(ema, params, decay)
        grad_norm = optax.tree.norm(grads)
        finite = state_lib.is_finite(loss, grad_norm)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema,
        )
        kept = state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)
        new_state = state_lib.select(finite, new_state, kept)
        if logits.ndim == 2 and batch["label"].ndim == 1:
            accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask) / jnp.maximum(
                jnp.sum(mask), 1
            )
        else:
            hits = ((logits > 0) == (batch["label"] > 0.5)).mean(-1)
            accuracy = jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": grad_norm,
            # val_plateau scales the updates after the schedule: report the effective rate.
            "learning_rate": schedule(state.step) * optim.plateau_scale(state.opt_state),
            "nonfinite_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    return train_step


def make_predict_fn(model: densenet.DenseNet, label_kind: str):
    """`predict(state, images) -> probabilities` (softmax or sigmoid), EMA params if present."""

    def predict(state: state_lib.ClassifierState, images):
        params = state.ema_params if state.ema_params is not None else state.params
        logits = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=False
        )
        if label_kind == sources.MULTILABEL:
            return jax.nn.sigmoid(logits)
        return jax.nn.softmax(logits, axis=-1)

    return predict


def compile_steps(model, tx, loss_fn, schedule, mesh, abstract_state, *, ema_decay, label_kind):
    """Jits train/predict once: batch sharded over "data", state replicated and donated."""
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.data_sharding(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    train_step = jax.jit(
        make_train_step(model, tx, loss_fn, schedule, ema_decay=ema_decay),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
        compiler_options=parallel.cpu_compiler_options(),
    )
    predict = jax.jit(
        make_predict_fn(model, label_kind),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=batch_sharding,
        compiler_options=parallel.cpu_compiler_options(),
    )
    return train_step, predict


class ValPlateau:
    """Feeds validation losses to a val_plateau optimizer state (CheXNet's schedule).

    The driver's eval function calls `observe(labels, probs)` with the validation predictions:
    the training loss of those (same class weights) is the validation loss. `self.train_step`
    (the driver's step, wrapped) applies it to the state (jitted `optim.plateau_observe`) just
    before its next update, so every decision lives in the optimizer state that checkpoints
    save. The loss of an evaluation at step S is applied after the checkpoint of step S was
    written, so a run resumed at an evaluation step evaluates once more first (`resume`): the
    same state and data give the same loss, and the run continues exactly as an uninterrupted
    one. With another schedule every method is a no-op.
    """

    def __init__(
        self,
        config,
        spec: sources.DatasetSpec,
        weights: np.ndarray,
        sharding: jax.sharding.Sharding,
        train_step: Callable,
    ):
        self.active = config.optim.schedule == "val_plateau"
        self._spec, self._weights = spec, weights
        self._eval_every = int(config.train.eval_every)
        factor = float(config.optim.get("plateau_factor", 0.1))
        patience = int(config.optim.get("plateau_patience", 1))

        def apply(state, loss):
            return state.replace(
                opt_state=optim.plateau_observe(state.opt_state, loss, factor, patience)
            )

        self._apply = jax.jit(apply, out_shardings=sharding, donate_argnums=0)
        self._pending: float | None = None
        self.train_step = self.wrap(train_step)

    def observe(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """Validation predictions -> {"val/loss": loss} (pending for the next step); {} if off."""
        if not self.active:
            return {}
        self._pending = loss_from_probs(self._spec, self._weights, labels, probs)
        return {"val/loss": self._pending}

    def wrap(self, train_step: Callable) -> Callable:
        if not self.active:
            return train_step

        def step(state, batch, rng):
            if self._pending is not None:
                state = self._apply(state, np.float32(self._pending))
                self._pending = None
            return train_step(state, batch, rng)

        return step

    def resume(self, eval_fn: Callable, state: Any, start_step: int) -> None:
        """Re-observes the evaluation a resumed run's checkpoint was saved right after."""
        every = self._eval_every
        if self.active and start_step > 0 and every > 0 and start_step % every == 0:
            eval_fn(state, start_step)


def check_recipe(config) -> None:
    """Requirements between fields (ConfigError naming the field): val_plateau watches the
    validation loss, so it needs evaluations; a preset that declares
    `model.require_pretrained` (CheXNet) starts from ImageNet weights, never silently from
    scratch."""
    config_lib.check(
        config.optim.schedule != "val_plateau" or config.train.eval_every > 0,
        "optim.schedule",
        "'val_plateau' needs train.eval_every > 0 (it watches the validation loss)",
    )
    config_lib.check(
        not config.model.get("require_pretrained", False) or bool(config.model.pretrained),
        "model.pretrained",
        "this preset starts from ImageNet weights: pass torchvision's densenet121 state_dict "
        "(e.g. densenet121-a639ec97.pth) as --config.model.pretrained=PATH, or "
        "--config.model.require_pretrained=False to train from scratch",
    )
