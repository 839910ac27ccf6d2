"""Inception-v3 as used for FID (the TensorFlow 2015-12-05 graph, as ported by pytorch-fid).

FID numbers are only comparable when every paper computes them with the same network, so this
is the "FID Inception", not torchvision's ImageNet Inception-v3. It differs from torchvision's
in three places (pytorch-fid's `FIDInceptionA/C/E_1/E_2`):
  * the 3x3 average pools inside Mixed_5b..5d, Mixed_6b..6e and Mixed_7b exclude the zero
    padding from the average (TensorFlow's behaviour, `count_include_pad=False`),
  * Mixed_7c pools its pool branch with a 3x3 *max* pool (stride 1, padding 1),
  * the classifier has 1008 outputs (unused here: features stop at the global pool).

`FIDInceptionV3` returns the 2048-d "pool3" features (global average pool after Mixed_7c),
float32 [B, 2048]. It is inference-only: every BatchNorm uses its running statistics
(epsilon 1e-3, as torchvision's BasicConv2d).

Layer names follow torchvision's Inception3 (`Conv2d_1a_3x3/conv`, `Mixed_5b/branch1x1/bn`,
...), so `convert_state_dict` maps the pytorch-fid weight file one to one:

  variables = inception.load_fid_weights("pt_inception-2015-12-05-6726825d.pth")
  feats = inception.fid_features(variables, images)   # images [B, H, W(, C)] in [0, 1]

Preprocessing (`preprocess`), exactly as pytorch-fid's `InceptionV3(resize_input=True,
normalize_input=True)` forward does it:
  1. grayscale -> 3 channels by repetition (pytorch-fid's loader calls PIL `convert("RGB")`),
  2. resize to 299x299 by bilinear interpolation with half-pixel centres and *no* antialiasing
     (torch `F.interpolate(mode="bilinear", align_corners=False)`), implemented here as two
     small interpolation matrices, so it is exact and cheap; shrinking an image larger than
     299 px therefore aliases, as it does in pytorch-fid,
  3. [0, 1] -> [-1, 1] by 2x - 1.

Nothing here downloads weights: pass the path of the pytorch-fid release file
(`WEIGHTS_URL`). Reading a .pth needs torch (the `torch` extra); an .npz with the same keys
(`save_npz`) needs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cxrjax.models import torch_import

Dtype = Any

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
NUM_FEATURES = 2048
BN_EPSILON = 1e-3

_Pad = tuple[int, int]


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics) -> ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: _Pad = (0, 0)  # (rows, cols) on both sides, as torch's Conv2d padding
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(
            x
        )
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _Block(nn.Module, kw_only=True):
    """An Inception module: its compute `dtype` (keyword-only) and the BasicConvs it builds."""

    dtype: Dtype = jnp.float32

    def conv(self, *args: Any, **kwargs: Any) -> BasicConv:
        return BasicConv(*args, dtype=self.dtype, **kwargs)


class InceptionA(_Block):
    """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (`pool_features` maps)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, (1, 1), name="branch1x1")(x)
        b5 = self.conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = self.conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = self.conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = self.conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool-1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = self.conv(192, (1, 1), name="branch1x1")(x)
        b7 = self.conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = self.conv(c7, **row, name="branch7x7_2")(b7)
        b7 = self.conv(192, **col, name="branch7x7_3")(b7)
        bd = self.conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = self.conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = self.conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = self.conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = self.conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = self.conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = self.conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = self.conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = self.conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = self.conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    `pool` is "avg" (Mixed_7b, padding excluded) or "max" (Mixed_7c in the FID graph).
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = self.conv(320, (1, 1), name="branch1x1")(x)
        b3 = self.conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, **row, name="branch3x3_2a")(b3),
                self.conv(384, **col, name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = self.conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = self.conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, **row, name="branch3x3dbl_3a")(bd),
                self.conv(384, **col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        elif self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(_Block):
    """The FID Inception-v3 up to pool3. Input NHWC [B, 299, 299, 3] in [-1, 1] (see
    `preprocess`); output float32 [B, 2048]. Other sizes run (the network is convolutional up
    to the global pool) but only 299 px gives FID-comparable features."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [B, H, W, 3], got shape {x.shape}")
        x = x.astype(self.dtype)
        x = self.conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
        x = self.conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = self.conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # 73
        x = self.conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = self.conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        x = InceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)  # 17
        channels_7x7 = {"Mixed_6b": 128, "Mixed_6c": 160, "Mixed_6d": 160, "Mixed_6e": 192}
        for name, c7 in channels_7x7.items():
            x = InceptionC(c7, dtype=self.dtype, name=name)(x)
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)  # 8
        x = InceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)
        # [B, 2048] pool3, float32 (float64 when computing in float64, for parity tests).
        return jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))


# ----------------------------------------------------------------------------- preprocessing
def bilinear_matrix(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
    """[out_size, in_size] weights of torch's bilinear resize with align_corners=False.

    Output pixel i samples the input at (i + 0.5) * in/out - 0.5, clamped below at 0 (torch
    clamps negative source coordinates), between its two neighbours; no antialiasing. The
    coordinates are computed in `dtype` in torch's order, so the weights round as torch's do
    for float32 (or float64) images.
    """
    dtype = np.dtype(dtype)
    scale = dtype.type(in_size) / dtype.type(out_size)
    dst = np.arange(out_size, dtype=dtype)
    src = np.maximum(scale * (dst + dtype.type(0.5)) - dtype.type(0.5), dtype.type(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(dtype)
    weights = np.zeros((out_size, in_size), dtype)
    np.add.at(weights, (np.arange(out_size), lo), dtype.type(1.0) - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W], [B, H, W, 1] or [B, H, W, 3] in [0, 1] -> [B, size, size, 3] in [-1, 1].

    Grayscale repeated to RGB, pytorch-fid's bilinear resize (no antialias), then 2x - 1.
    """
    x = jnp.asarray(images)
    # float32, or float64 for float64 input under x64.
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W(, 1 or 3)], got shape {x.shape}")
    rows = jnp.asarray(bilinear_matrix(x.shape[1], size, x.dtype))
    cols = jnp.asarray(bilinear_matrix(x.shape[2], size, x.dtype))
    # HIGHEST: keep the resize exact in float32 on GPUs that would default to TF32.
    x = jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return 2.0 * x - 1.0


def fid_features(variables: Mapping[str, Any], images: jax.Array, dtype: Dtype = jnp.float32):
    """pool3 features [B, 2048] of images in [0, 1] (any size; resized to 299 as pytorch-fid)."""
    return FIDInceptionV3(dtype=dtype).apply(variables, preprocess(images))


def abstract_variables() -> Any:
    """ShapeDtypeStructs of the model's {"params", "batch_stats"} (no compute)."""
    return jax.eval_shape(
        FIDInceptionV3().init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )


# ----------------------------------------------------------------------------- weights
# flax leaf name -> torch suffix, per collection.
_TORCH_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(path: tuple[str, ...]) -> str:
    """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
    collection, *modules, leaf = path
    return ".".join([*modules, _TORCH_NAMES[(collection, leaf)]])


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid / torchvision Inception3 state_dict (arrays or tensors) -> flax variables.

    Conv weights [O, I, kh, kw] become [kh, kw, I, O]; BatchNorm weight/bias/running stats
    become scale/bias/mean/var. Keys the features do not use (fc.*, AuxLogits.*,
    num_batches_tracked) are ignored; a missing key or a shape mismatch raises ValueError.
    """
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    abstract = abstract_variables()
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves, missing, mismatched = [], [], []
    for path, leaf in flat:
        names = tuple(str(getattr(entry, "key", entry)) for entry in path)
        key = torch_key(names)
        if key not in arrays:
            missing.append(key)
            leaves.append(None)
            continue
        value = arrays[key]
        if names[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != leaf.shape:
            mismatched.append(f"{key}: {value.shape} vs {leaf.shape}")
        leaves.append(np.asarray(value, np.float32))
    if missing:
        raise ValueError(
            f"not an FID Inception state_dict: {len(missing)} missing keys, e.g. {missing[:3]} "
            f"(expected the pytorch-fid file from {WEIGHTS_URL})"
        )
    if mismatched:
        raise ValueError(f"shape mismatch converting the Inception weights: {mismatched[:3]}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def missing_weights_message(path: str | os.PathLike) -> str:
    return (
        f"Inception weights file {os.fspath(path)!r} not found. FID Inception features need "
        "pytorch-fid's weight file (a torch state_dict, ~92 MB): download it once from "
        f"{WEIGHTS_URL} and pass its local path (nothing here downloads weights)."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a .pth (torch state_dict, needs torch) or .npz (same keys) weight file."""
    path = os.fspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    state = torch_import.load_npz_or_torch(
        path, ", or convert it once to .npz with inception.save_npz on a machine that has torch"
    )
    if path.endswith(".npz"):
        return state
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return {key: _to_numpy(value) for key, value in state.items()}


def load_fid_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Flax variables from pytorch-fid's `pt_inception-2015-12-05-*.pth` (or an .npz copy)."""
    return convert_state_dict(read_state_dict(path))


def save_npz(state_dict_path: str | os.PathLike, npz_path: str | os.PathLike) -> None:
    """Rewrites a .pth weight file as .npz (same keys), readable without torch."""
    np.savez(npz_path, **read_state_dict(state_dict_path))
