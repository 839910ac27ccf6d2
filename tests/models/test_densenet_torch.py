"""Converter: torchvision DenseNet state_dict files -> flax, checked against torch's own outputs.

The torch tests skip when torch/torchvision are missing (`pip install -e '.[torch]'`). Torch
models get random BatchNorm affines and data-dependent running stats, so a swapped mean/var, a
wrong transpose or a wrong epsilon changes the outputs.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import densenet, torch_import

# A small torchvision DenseNet (imagenet stem, 2 blocks): fast, same code paths as densenet121.
SMALL = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)
SIZE = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def tv():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    return torch, torchvision


def _randomize(torch, model, seed):
    """Random BN affines and classifier bias; running stats from a train-mode pass on noise."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.2, generator=gen)
            m.momentum = (
                None  # cumulative average: after one batch, the running stats are its stats
            )
        model.classifier.bias.normal_(0.0, 0.5, generator=gen)
        model.train()
        model(torch.randn(8, 3, SIZE, SIZE, generator=gen))
        for m in norms:  # move them off the batch statistics too
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=gen))
    return model.eval()


def _torch_outputs(torch, model, x_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.relu(model.features(x)), 1)
        pooled = torch.flatten(pooled, 1)
        return model.classifier(pooled).numpy(), pooled.numpy()


@functools.lru_cache
def _apply_fn(model):
    return jax.jit(functools.partial(model.apply, train=False, return_features=True))


def _abstract_init(model, channels, batch=2):
    x = jnp.zeros((batch, SIZE, SIZE, channels))
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _assert_parity(model, variables, x, ref_logits, ref_features):
    logits, features = _apply_fn(model)(variables, x)
    assert np.abs(ref_logits).max() > 0.1  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(features, ref_features, atol=TOL, rtol=0)


def _images(channels, n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, channels)).astype(np.float32)


@pytest.fixture(scope="module")
def small_torch(tv):
    torch, torchvision = tv
    torch.manual_seed(0)
    return _randomize(torch, torchvision.models.DenseNet(num_classes=5, **SMALL), seed=1)


def _chexnet_style(state_dict):
    """As the common CheXNet reimplementation saves it: DataParallel(wrapper.densenet121), old
    `norm.1` names, classifier = Sequential(Linear, Sigmoid), inside a training checkpoint."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("classifier.", "classifier.0.")
        if ".denselayer" in key:
            for name in ("norm1", "norm2", "conv1", "conv2"):
                key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.")
        out["module.densenet121." + key] = value
    return {"epoch": 7, "best_loss": 0.16, "state_dict": out}


@pytest.mark.parametrize("layout", ["torchvision", "chexnet", "npz"])
def test_small_parity_per_checkpoint_layout(tv, small_torch, tmp_path, layout, monkeypatch):
    torch, _ = tv
    state_dict = small_torch.state_dict()
    path = tmp_path / "ckpt.pth"
    if layout == "chexnet":
        checkpoint = _chexnet_style(state_dict)
        assert any(".norm.1." in k for k in checkpoint["state_dict"])
        torch.save(checkpoint, path)
    else:
        torch.save(state_dict, path)
    if layout == "npz":
        torch_import.export_npz(path, tmp_path / "ckpt.npz")
        path = tmp_path / "ckpt.npz"
        monkeypatch.setitem(sys.modules, "torch", None)  # reading .npz must not need torch

    model = densenet.DenseNet(num_classes=5, stem="imagenet", **SMALL)
    variables = torch_import.load_pretrained(path, _abstract_init(model, 3))
    x = _images(3)
    monkeypatch.undo()
    _assert_parity(model, variables, x, *_torch_outputs(torch, small_torch, x))
    stats = variables["batch_stats"]["denseblock2"]["denselayer2"]["norm2"]
    torch_norm = small_torch.features.denseblock2.denselayer2.norm2
    np.testing.assert_array_equal(stats["var"], torch_norm.running_var.numpy())


def test_gray_stem_matches_torch_on_replicated_gray(tv, small_torch, tmp_path):
    """1-channel model (summed RGB filters) on gray == torch 3-channel model on [gray]*3."""
    torch, _ = tv
    torch.save(small_torch.state_dict(), tmp_path / "ckpt.pth")
    model = densenet.DenseNet(num_classes=5, **SMALL)
    variables = torch_import.load_pretrained(tmp_path / "ckpt.pth", _abstract_init(model, 1))
    assert variables["params"]["conv0"]["kernel"].shape == (7, 7, 1, 16)
    gray = _images(1, seed=3)
    _assert_parity(model, variables, gray, *_torch_outputs(torch, small_torch, gray.repeat(3, -1)))


def test_head_modes(tv, small_torch, tmp_path):
    torch, _ = tv
    path = tmp_path / "ckpt.pth"
    torch.save(small_torch.state_dict(), path)
    x = jnp.zeros((1, SIZE, SIZE, 3))

    def init(num_classes):
        model = densenet.DenseNet(num_classes=num_classes, **SMALL)
        return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

    init2, init5 = init(2), init(5)
    # auto: a 5-class checkpoint head does not fit a 2-class model -> the model's own init stays.
    loaded = torch_import.load_pretrained(path, init2)
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["classifier"], init2["params"]["classifier"]
    )
    np.testing.assert_array_equal(
        loaded["params"]["conv0"]["kernel"],
        small_torch.features.conv0.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    # reinit: the model's head even when the checkpoint's fits.
    loaded = torch_import.load_pretrained(path, init5, head="reinit")
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["classifier"], init5["params"]["classifier"]
    )
    # checkpoint: the checkpoint's head or an error.
    loaded = torch_import.load_pretrained(path, init5, head="checkpoint")
    np.testing.assert_array_equal(
        loaded["params"]["classifier"]["bias"], small_torch.classifier.bias.detach().numpy()
    )
    with pytest.raises(ValueError, match="classifier"):
        torch_import.load_pretrained(path, init2, head="checkpoint")
    # A head that must be reinitialised needs concrete init values, not eval_shape's.
    with pytest.raises(ValueError, match="concrete"):
        torch_import.load_pretrained(path, jax.eval_shape(lambda: init2))
    # A different backbone fails loudly.
    with pytest.raises(ValueError, match="shape mismatches"):
        other = densenet.DenseNet(num_classes=5, **{**SMALL, "growth_rate": 12})
        torch_import.load_pretrained(path, _abstract_init(other, 3))


def test_canonicalize_without_torch():
    """Prefixes, old names, nesting and counters are handled on plain numpy dicts."""
    w = np.zeros((1,), np.float32)
    checkpoint = {
        "optimizer": {"lr": 0.1},
        "model": {
            "module.net.features.conv0.weight": np.zeros((4, 3, 7, 7), np.float32),
            "module.net.features.denseblock1.denselayer1.norm.1.running_var": w,
            "module.net.features.denseblock1.denselayer1.conv.2.weight": w,
            "module.net.features.norm0.num_batches_tracked": np.array(3),
            "module.net.classifier.0.bias": w,
            "module.aux.weight": w,
        },
    }
    assert sorted(torch_import.canonicalize_state_dict(checkpoint)) == [
        "classifier.0.bias",
        "features.conv0.weight",
        "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock1.denselayer1.norm1.running_var",
    ]
    with pytest.raises(ValueError, match="no DenseNet state_dict"):
        torch_import.canonicalize_state_dict({"state_dict": {"conv.weight": w}})


def test_torch_file_without_torch_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="npz"):
        torch_import.read_state_dict(tmp_path / "weights.pth")


@pytest.mark.slow
def test_densenet121_parity_with_torchvision(tv, tmp_path):
    """The one full-size compile: every densenet121 layer name maps, logits and features agree."""
    torch, torchvision = tv
    torch.manual_seed(0)
    reference = _randomize(torch, torchvision.models.densenet121(), seed=2)
    torch.save(reference.state_dict(), tmp_path / "densenet121.pth")
    model = densenet.DenseNet121(num_classes=1000)
    variables = torch_import.load_pretrained(tmp_path / "densenet121.pth", _abstract_init(model, 3))
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 7_978_856
    x = _images(3, seed=4)
    _assert_parity(model, variables, x, *_torch_outputs(torch, reference, x))
