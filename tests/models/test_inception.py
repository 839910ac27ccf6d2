"""FID Inception-v3: pytorch-fid parity (random weights, no download), resize, weight errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import features
from cxrjax.models import inception

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")


def random_fid_inception():
    """pytorch-fid's fid_inception_v3() structure with random weights and realistic BN stats.

    pytorch-fid's own builder downloads the weights, so this repeats its construction offline:
    torchvision Inception3 (1008 classes, no aux head) with the FID blocks swapped in.
    """
    import torchvision

    fid = pytorch_fid_inception
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            # Non-trivial affine parameters; running statistics set by a forward pass below.
            module.weight.data = 1.0 + 0.2 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
            module.momentum = None  # running stats = the calibration batch's statistics
    return net


def test_pool3_features_match_pytorch_fid_with_random_weights(tmp_path, monkeypatch):
    """pytorch-fid's InceptionV3([3]) (resize + normalise + blocks) vs ours, on 28 px gray images.

    float64 on both sides isolates architecture, weight conversion and preprocessing: they agree
    to ~1e-12. Our float32 path is then compared with that float64 reference: this random
    network amplifies input rounding ~200x by pool3 (measured), so float32 features (ours or
    torch's) sit ~1e-4 of their scale from float64; the bound is 1e-3 of it.
    """
    net = random_fid_inception()
    monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", lambda: net)
    wrapper = pytorch_fid_inception.InceptionV3([3])  # resize_input, normalize_input: defaults

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    images[1] = images[1] // 2 + 64
    x01 = images.astype(np.float64) / 255.0
    # pytorch-fid's loader: PIL convert("RGB") repeats gray into 3 channels, ToTensor -> [0, 1].
    x_torch = torch.from_numpy(np.repeat(x01[:, None], 3, axis=1))
    # BatchNorm running stats from one train-mode pass over these images, so activations keep
    # an O(1) scale through all 94 BatchNorms (default stats 0/1 would blow up).
    wrapper.train()
    with torch.no_grad():
        wrapper(x_torch.float())
    wrapper.eval()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    variables = inception.load_fid_weights(path)

    with torch.no_grad():
        expected = wrapper.double()(x_torch)[0].numpy().reshape(2, -1)
    assert expected.shape == (2, inception.NUM_FEATURES)
    scale = np.abs(expected).max()
    assert 0.1 < scale < 100  # O(1) features: the tolerances mean something

    with jax.enable_x64(True):
        # As torch's .double(): the same float32 weights, widened.
        variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
        model64 = inception.FIDInceptionV3(dtype=jnp.float64)
        apply64 = jax.jit(lambda v, x: model64.apply(v, inception.preprocess(x)))
        got64 = np.asarray(apply64(variables64, jnp.asarray(x01, jnp.float64)))
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, atol=1e-9 * scale, rtol=0)

    # float32, as used: the inception: extractor from the .pth, batched over the 4 test devices.
    extractor = features.make_extractor(f"inception:{path}")
    got32 = features.extract(extractor, images)
    assert got32.shape == (2, 2048) and got32.dtype == np.float32
    error32 = np.abs(got32 - expected).max()
    assert error32 < 1e-3 * scale, f"float32 features differ by {error32:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("in_size", [28, 64, 400])
def test_resize_matches_torch_bilinear_without_antialias(in_size):
    rng = np.random.default_rng(in_size)
    images = rng.random((2, in_size, in_size, 1), dtype=np.float32)
    got = np.asarray(inception.preprocess(images))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    expected = torch.nn.functional.interpolate(
        x, size=(299, 299), mode="bilinear", align_corners=False
    )
    expected = 2 * expected.numpy().transpose(0, 2, 3, 1) - 1
    np.testing.assert_allclose(got, np.repeat(expected, 3, axis=-1), atol=1e-5)


def test_npz_copy_holds_the_same_arrays(tmp_path):
    state = {"Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3), "fc.bias": torch.zeros(1008)}
    torch.save(state, tmp_path / "w.pth")
    inception.save_npz(tmp_path / "w.pth", tmp_path / "w.npz")
    copy = inception.read_state_dict(tmp_path / "w.npz")
    assert sorted(copy) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(copy[key], value.numpy())


def test_missing_weights_file_names_the_download_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases/download/fid_weights"):
        inception.load_fid_weights(tmp_path / "absent.pth")


def test_wrong_state_dict_is_a_clear_error():
    with pytest.raises(ValueError, match="not an FID Inception state_dict"):
        inception.convert_state_dict({"features.conv0.weight": np.zeros((64, 3, 7, 7))})
