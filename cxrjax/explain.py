"""Where a classifier looks: class activation maps (CAM) and Grad-CAM, and film overlays.

CAM (Zhou et al. 2016; the heatmaps of CheXNet): for a network that ends in global average
pooling and one linear layer, the map of class k is sum_c w[c, k] * A_c(x, y) over the last
feature maps A (DenseNet: relu(norm5(.))), bias left out. Grad-CAM (Selvaraju et al. 2017):
at any layer, channel weights alpha_c = spatial mean of d logit_k / d A_c, map =
relu(sum_c alpha_c A_c); by default at the output of the last dense block. Both are computed
at the feature-map resolution (image / 32 for the ImageNet stem, / 2 per transition for the
small stem), passed through a ReLU and resized bilinearly to the image; `overlays` scales each
map to [0, 1] for display.

Grad-CAM works on any flax module: the chosen submodule's output gets a zero perturbation
through `nn.intercept_methods`, and the gradient with respect to it is the gradient with
respect to that activation.

`overlays(workdir, split, image_indices)` is the entry for reports: it restores a
train_classifier workdir's checkpoint (best by validation, else latest) and writes, per film,
the film, the heatmap and both blended, titled with the predicted probability; the same
indices give the same films for every arm of an experiment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cxrjax import config as config_lib
from cxrjax.data import sources

METHODS = ("cam", "gradcam")


def _resize(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w] -> [B, H, W] bilinear."""
    return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def cam(
    model: nn.Module, variables: Mapping[str, Any], images: jax.Array, class_index
) -> jax.Array:
    """CAM heatmaps [B, H, W] (ReLU'd, not normalised) of `class_index` (int or [B] ints).

    Needs the DenseNet head: relu(norm5) -> global average pool -> `classifier` Dense.
    """
    _, state = model.apply(
        variables,
        images,
        train=False,
        capture_intermediates=lambda module, method: module.name == "norm5",
        mutable=["intermediates"],
    )
    features = nn.relu(state["intermediates"]["norm5"]["__call__"][0].astype(jnp.float32))
    kernel = variables["params"]["classifier"]["kernel"].astype(jnp.float32)  # [C, K]
    weights = kernel.T[jnp.broadcast_to(jnp.asarray(class_index), images.shape[:1])]  # [B, C]
    maps = jnp.einsum("bhwc,bc->bhw", features, weights)
    return _resize(nn.relu(maps), images.shape[1:3])


def last_block(model: nn.Module) -> str:
    """Grad-CAM's default layer: the last dense block of a DenseNet."""
    return f"denseblock{len(model.block_config)}"


def gradcam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    class_index,
    layer: str | None = None,
) -> jax.Array:
    """Grad-CAM heatmaps [B, H, W] (ReLU'd, not normalised) of `class_index` at `layer` (a
    submodule name; default `last_block(model)`)."""
    layer = layer or last_block(model)
    index = jnp.broadcast_to(jnp.asarray(class_index), images.shape[:1])

    def forward(delta):
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == layer and context.method_name == "__call__":
                if delta is not None:
                    out = out + delta.astype(out.dtype)
                captured.append(out)
            return out

        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, images, train=False)
        if not captured:
            raise ValueError(f"no submodule named {layer!r} in {type(model).__name__}")
        chosen = jnp.take_along_axis(logits, index[:, None], axis=1).sum()
        return chosen, captured[-1]

    shape = jax.eval_shape(lambda: forward(None)[1])
    zeros = jnp.zeros(shape.shape, jnp.float32)
    grads, activation = jax.grad(forward, has_aux=True)(zeros)
    alpha = grads.mean(axis=(1, 2))  # [B, C]
    maps = jnp.einsum("bhwc,bc->bhw", activation.astype(jnp.float32), alpha)
    return _resize(nn.relu(maps), images.shape[1:3])


def heatmaps(method: str, model, variables, images, class_index, layer=None) -> jax.Array:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "cam":
        return cam(model, variables, images, class_index)
    return gradcam(model, variables, images, class_index, layer)


def mass_fraction(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each heatmap's (non-negative) mass inside its boolean mask: [B]."""
    maps = np.maximum(np.asarray(maps, np.float64), 0.0)
    total = maps.sum(axis=(1, 2))
    return np.where(total > 0, (maps * masks).sum(axis=(1, 2)) / np.maximum(total, 1e-12), 0.0)


# --- a trained workdir -> overlays ----------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """A train_classifier workdir's model, variables and data description."""

    config: Any
    model: nn.Module
    variables: dict
    spec: sources.DatasetSpec
    step: int


def restore(workdir: str, step: int | None = None) -> Restored:
    """Restores a classifier checkpoint (step None: best by validation, else latest)."""
    from cxrjax.train import runs

    run = runs.load(workdir, step=step)
    state = run.state
    params = state.ema_params if state.ema_params is not None else state.params
    variables = jax.device_get({"params": params, "batch_stats": state.batch_stats})
    return Restored(run.config, run.modules["model"], variables, run.spec, run.step)


def _films(restored: Restored, split: str, indices: Sequence[int]) -> tuple[np.ndarray, list]:
    """uint8 films [N, R, R] and their records' (id, label) for `indices` of `split`."""
    from cxrjax.data import builders, imageio
    from cxrjax.train import runs

    config = restored.config
    source, _ = builders.load(config.data.name, split, **runs.dataset_options(config.data))
    resolution = int(config.data.resolution)
    films, meta = [], []
    for index in indices:
        if not 0 <= index < len(source):
            raise config_lib.ConfigError(
                f"{split} has {len(source)} images; index {index} is out of range"
            )
        record = source[int(index)]
        image = imageio.decode_gray(record["image"], f"{split} record {index}")
        films.append(imageio.resize_square(image, resolution))
        record_id = record.get("id", str(index))
        meta.append(
            (
                record_id.decode() if isinstance(record_id, bytes) else str(record_id),
                record["label"],
            )
        )
    return np.stack(films), meta


def overlays(
    workdir: str,
    split: str = "val",
    image_indices: Sequence[int] | None = None,
    *,
    num_images: int = 8,
    method: str = "gradcam",
    class_name: str | None = None,
    output_dir: str | None = None,
    step: int | None = None,
    layer: str | None = None,
) -> list[str]:
    """Writes heatmap overlays for films of `split` and returns the figure paths.

    `image_indices` (records of the split; default the first `num_images`) fix the films, so
    every arm of an experiment can show the same ones. The explained class: `class_name`, else
    class 1 for binary models (e.g. pneumonia), else the most probable class / finding. Writes
    `<output_dir>/<split>_<method>.png` (all films: film, heatmap, overlay per row) and
    `<output_dir>/<split>_<method>_<index>.png` per film; default output_dir is
    `<workdir>/explain`. Returns [grid, per-film...].
    """
    restored = restore(workdir, step)
    spec = restored.spec
    indices = list(image_indices) if image_indices is not None else list(range(num_images))
    films, meta = _films(restored, split, indices)
    mean, std = float(restored.config.data.mean), float(restored.config.data.std)
    images = jnp.asarray((films[..., None] / 255.0 - mean) / std, jnp.float32)
    logits = restored.model.apply(restored.variables, images, train=False)
    if spec.label_kind == sources.MULTILABEL:
        probs = np.asarray(jax.nn.sigmoid(logits))
    else:
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    if class_name is not None:
        if class_name not in spec.class_names:
            raise config_lib.ConfigError(
                f"class {class_name!r} is not one of {list(spec.class_names)}"
            )
        targets = np.full(len(indices), spec.class_names.index(class_name))
    elif spec.label_kind == sources.MULTICLASS and spec.num_classes == 2:
        targets = np.ones(len(indices), int)
    else:
        targets = probs.argmax(axis=1)
    maps = np.asarray(
        heatmaps(method, restored.model, restored.variables, images, jnp.asarray(targets), layer)
    )
    output_dir = output_dir or os.path.join(os.path.abspath(os.path.expanduser(workdir)), "explain")
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for k in range(len(indices)):
        name = spec.class_names[targets[k]]
        record_id, label = meta[k]
        title = (
            f"{record_id}: P({name}) = {probs[k, targets[k]]:.2f}; label {_label_text(spec, label)}"
        )
        rows.append((films[k], maps[k], title))
    grid = _save_rows(rows, os.path.join(output_dir, f"{split}_{method}.png"), method)
    paths = [grid]
    for (film, heat, title), index in zip(rows, indices, strict=True):
        path = os.path.join(output_dir, f"{split}_{method}_{index}.png")
        paths.append(_save_rows([(film, heat, title)], path, method))
    return paths


def _label_text(spec: sources.DatasetSpec, label) -> str:
    label = np.asarray(label)
    if spec.label_kind == sources.MULTILABEL:
        found = [n for n, v in zip(spec.class_names, label, strict=True) if v]
        return "+".join(found) or "no finding"
    return spec.class_names[int(label)]


def _save_rows(rows, path: str, method: str) -> str:
    """One row per film: film | heatmap | overlay (heatmap scaled to [0, 1] per film)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 2.6 * len(rows)), dpi=110)
    FigureCanvasAgg(figure)
    label = {"cam": "CAM", "gradcam": "Grad-CAM"}[method]
    for r, (film, heat, title) in enumerate(rows):
        scaled = heat / heat.max() if heat.max() > 0 else heat
        axes = [figure.add_subplot(len(rows), 3, 3 * r + c + 1) for c in range(3)]
        axes[0].imshow(film, cmap="gray", vmin=0, vmax=255)
        axes[1].imshow(scaled, cmap="jet", vmin=0, vmax=1)
        axes[2].imshow(film, cmap="gray", vmin=0, vmax=255)
        axes[2].imshow(scaled, cmap="jet", vmin=0, vmax=1, alpha=0.4)
        for axis, name in zip(axes, (f"{title}\nfilm", label, "overlay"), strict=True):
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(name, fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return path
