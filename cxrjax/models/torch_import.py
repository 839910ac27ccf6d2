"""Torchvision DenseNet `state_dict` files -> flax variables for `cxrjax.models.densenet`.

For ImageNet weights or CheXNet-style checkpoints a user already has on disk: nothing downloads.
Accepted layouts (all seen in the wild):
  - torchvision's own keys: `features.conv0.weight`, ..., `classifier.weight`;
  - any prefix before `features.` (`module.` from DataParallel, `module.densenet121.` from the
    common CheXNet reimplementation, `model.`, ...): found from where `features.conv0.weight` sits;
  - the pre-0.3 torchvision names `norm.1` / `conv.1` inside dense layers, remapped with the same
    regex torchvision's loader uses;
  - a state_dict nested in a training checkpoint (`{'state_dict': ..., 'optimizer': ...}`);
  - a classifier wrapped in a Sequential (CheXNet's `classifier.0` = Linear followed by Sigmoid; the
    sigmoid is not part of the flax model, which returns logits).

Reading `.pth`/`.pt`/`.tar`/`.bin` needs torch (`torch.load(weights_only=True)`, which refuses
pickled code). A `.npz` of the state_dict is read with numpy alone: make one where torch is
installed with `export_npz(src, dst)`, or without cxrjax:
  `np.savez(dst, **{k: v.float().numpy() for k, v in torch.load(src, weights_only=True).items()})`.

Typical use:
  model = densenet.DenseNet121(num_classes=2)
  init = model.init(rng, jnp.zeros((1, 224, 224, 1)), train=False)
  variables = torch_import.load_pretrained("densenet121.pth", init)  # 1-channel stem, new head
"""

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Variables = dict[str, Any]

# torchvision.models.densenet._load_state_dict: '...denselayer1.norm.1.weight' -> '...norm1.weight'.
_OLD_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_ANCHOR = "features.conv0.weight"
_CLASSIFIER_KEY = re.compile(r"^classifier\.(?:(\d+)\.)?(weight|bias)$")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_BN_PARAMS = {"weight": "scale", "bias": "bias"}
HEAD_MODES = ("auto", "reinit", "checkpoint")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; .float() also covers bf16/fp16 checkpoints
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _find_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The mapping that holds the weights: `obj` itself or one nested under a known key."""
    if any(isinstance(k, str) and k.endswith(_ANCHOR) for k in obj):
        return obj
    nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
    nested += [k for k, v in obj.items() if isinstance(v, Mapping) and k not in nested]
    for key in nested:
        try:
            return _find_state_dict(obj[key])
        except ValueError:
            continue
    raise ValueError(
        f"no DenseNet state_dict found: no key ends with {_ANCHOR!r} at the top level or under "
        f"a nested mapping (top-level keys: {sorted(map(str, obj))[:10]})"
    )


def load_npz_or_torch(path: str, torch_hint: str) -> Any:
    """{key: array} of a `.npz`; otherwise what `torch.load` (CPU, weights only) makes of the file.

    Without torch the ImportError names the path, the extra to install, then `torch_hint`.
    """
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch (pip install 'cxrjax[torch]'){torch_hint}"
        ) from e
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of the DenseNet state_dict in a `.npz`, or in a torch file (needs torch)."""
    path = os.fspath(path)
    obj = load_npz_or_torch(
        path, "; or convert it to .npz where torch is installed (see this module's docstring)"
    )
    if not isinstance(obj, Mapping):  # Only a torch file can hold something else.
        raise ValueError(f"{path}: expected a state_dict or a checkpoint dict, got {type(obj)}")
    return {k: _to_numpy(v) for k, v in _find_state_dict(obj).items()}


def canonicalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision's current key names: prefix stripped, old `norm.1` names remapped.

    Keys outside the DenseNet (not under the prefix of `features.conv0.weight`) and BatchNorm's
    `num_batches_tracked` counters are dropped.
    """
    state_dict = _find_state_dict(state_dict)
    anchors = [k for k in state_dict if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(f"expected one key ending with {_ANCHOR!r}, found {anchors}")
    prefix = anchors[0][: -len(_ANCHOR)]
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
            continue
        key = key[len(prefix) :]
        match = _OLD_LAYER_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = _to_numpy(value)
    return out


def _adapt_stem(kernel: np.ndarray, in_channels: int | None) -> np.ndarray:
    """conv0 kernel [kh, kw, C, O] for `in_channels` input channels.

    3 -> 1 sums the RGB filters: a grayscale image replicated to RGB gives
    sum_c W_c * g = (sum_c W_c) * g, so the 1-channel model on g matches the 3-channel model on
    [g, g, g] exactly (and saves the replication). This holds when all three channels carry the
    same values, i.e. when the gray image is normalised with one mean/std; with ImageNet's
    per-channel mean/std, normalise gray with their averages for a close match.
    1 -> 3 spreads the filter as W / 3 per channel, the inverse of the same identity.
    """
    have = kernel.shape[2]
    if in_channels is None or in_channels == have:
        return kernel
    if have == 3 and in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    if have == 1 and in_channels == 3:
        return np.repeat(kernel / 3.0, 3, axis=2)
    raise ValueError(f"cannot adapt a {have}-channel stem to {in_channels} channels")


def _set(tree: dict, path: list[str], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    if path[-1] in tree:
        raise ValueError(f"two checkpoint entries map to {'/'.join(path)}")
    tree[path[-1]] = value


def convert_state_dict(
    state_dict: Mapping[str, Any], *, in_channels: int | None = None, include_head: bool = True
) -> Variables:
    """A torchvision DenseNet state_dict (any layout above) -> {params, batch_stats} numpy trees.

    Works for any torchvision `DenseNet(...)` configuration (121/169/201/161 or custom) with the
    "imagenet" stem. `in_channels=1` sums conv0's RGB filters (see `_adapt_stem`); None keeps the
    checkpoint's. `include_head=False` leaves out the classifier (to train a new one).
    """
    state_dict = canonicalize_state_dict(state_dict)
    params: dict = {}
    stats: dict = {}
    heads = {}
    for key, value in state_dict.items():
        value = np.asarray(value, np.float32)
        head = _CLASSIFIER_KEY.match(key)
        if head:
            heads.setdefault(head.group(1), {})[head.group(2)] = value
            continue
        if not key.startswith("features."):
            raise ValueError(f"unexpected key {key!r} (not under features. or classifier)")
        *path, kind = key[len("features.") :].split(".")
        if kind == "weight" and value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
            kernel = value.transpose(2, 3, 1, 0)
            if path == ["conv0"]:
                kernel = _adapt_stem(kernel, in_channels)
            _set(params, path + ["kernel"], kernel)
        elif kind in _BN_PARAMS and value.ndim == 1:
            _set(params, path + [_BN_PARAMS[kind]], value)
        elif kind in _BN_STATS:
            _set(stats, path + [_BN_STATS[kind]], value)
        else:
            raise ValueError(f"unexpected key {key!r} with shape {value.shape}")
    if len(heads) > 1:
        raise ValueError(
            f"classifier has {len(heads)} weighted layers ({sorted(heads)}); expected one"
        )
    if include_head:
        if not heads:
            raise ValueError("the checkpoint has no classifier; pass include_head=False")
        (head,) = heads.values()
        params["classifier"] = {"kernel": head["weight"].T, "bias": head["bias"]}
    return {"params": params, "batch_stats": stats}


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        _set(out, list(path), value)
    return out


def load_pretrained(
    path: str | os.PathLike, init_variables: Mapping[str, Any], *, head: str = "auto"
) -> Variables:
    """Variables for a model whose freshly initialised variables are `init_variables`.

    The stem's input channels come from `init_variables` (1 sums RGB filters). Every backbone
    entry must match the model's tree and shapes, so a wrong architecture fails loudly. `head`:
    "auto" keeps the checkpoint's classifier when its shape fits and otherwise keeps the
    initialised one (e.g. ImageNet's 1000 classes -> 2); "reinit" always keeps the initialised
    one; "checkpoint" requires the checkpoint's. Arrays take the dtypes of `init_variables`.
    When the checkpoint supplies everything, `init_variables` may be abstract
    (`jax.eval_shape(model.init, ...)`), which skips compiling the initialiser.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    in_channels = init_variables["params"]["conv0"]["kernel"].shape[2]
    loaded = convert_state_dict(
        read_state_dict(path), in_channels=in_channels, include_head=head != "reinit"
    )
    target = {c: _flatten(init_variables[c]) for c in ("params", "batch_stats")}
    result = {}
    for collection, want in target.items():
        got = _flatten(loaded[collection])
        is_head = lambda p: p[0] == "classifier"
        if head == "auto":
            head_fits = all(
                k in want and want[k].shape == v.shape for k, v in got.items() if is_head(k)
            )
            if not head_fits:
                shapes = {k[-1]: v.shape for k, v in got.items() if is_head(k)}
                logging.info(
                    "%s: classifier %s does not fit the model; keeping its own", path, shapes
                )
                got = {k: v for k, v in got.items() if not is_head(k)}
        missing = sorted("/".join(k) for k in set(want) - set(got) if not is_head(k))
        extra = sorted("/".join(k) for k in set(got) - set(want))
        wrong = sorted(
            f"{'/'.join(k)}: {got[k].shape} vs {want[k].shape}"
            for k in set(got) & set(want)
            if got[k].shape != want[k].shape
        )
        if missing or extra or wrong:
            raise ValueError(
                f"{path} does not fit the model ({collection}): missing {missing[:5]}, "
                f"unexpected {extra[:5]}, shape mismatches {wrong[:5]}"
            )
        merged = dict(want)
        merged.update({k: np.asarray(v, dtype=want[k].dtype) for k, v in got.items()})
        kept = sorted("/".join(k) for k in set(want) - set(got))
        if kept and not all(isinstance(merged[k], np.ndarray | jax.Array) for k in want):
            raise ValueError(
                f"{kept[:5]} are not in the checkpoint or do not fit, so they keep their "
                "initial values: pass concrete init_variables (model.init), not jax.eval_shape's"
            )
        result[collection] = _unflatten(merged)
    return result


def export_npz(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Save a torch DenseNet checkpoint's canonical state_dict as `.npz`, for use without torch."""
    np.savez(dst, **canonicalize_state_dict(read_state_dict(src)))
