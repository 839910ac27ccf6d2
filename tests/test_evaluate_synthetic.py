"""launch.evaluate_synthetic end to end on the shipped data (pixel features), and its argument
errors, which must come before any data is read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrjax import quality
from cxrjax.config import ConfigError
from cxrjax.data import imageio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("normal", "pneumonia")


@pytest.fixture(scope="module")
def synthetic_folder(shipped_data_dir, tmp_path_factory):
    """A launch.synthesize-style folder: 20 val images per class (one folder holds 4 copies of
    training images, to be found as memorised) and a provenance.json naming the class order."""
    folder = tmp_path_factory.mktemp("synth")
    val = quality.load_dataset_split("pneumonia_mnist:val", data_dir=shipped_data_dir)
    train = quality.load_dataset_split("pneumonia_mnist:train", data_dir=shipped_data_dir)
    for index, name in enumerate(CLASSES):
        os.makedirs(folder / name)
        images = list(val.images[val.labels == index][:20])
        if name == "pneumonia":
            images += list(train.images[train.labels == index][:4])
        for i, image in enumerate(images):
            (folder / name / f"ddpm_s0_{i:06d}.png").write_bytes(imageio.encode_png(image))
    provenance = {"generator": "ddpm", "class_names": list(CLASSES), "seed": 0}
    (folder / "provenance.json").write_text(json.dumps(provenance))
    return folder


def run(*flags, timeout=300):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        # conftest's fast-compile setting and compile cache, for the subprocess too.
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "CXRJAX_TEST_CACHE", os.path.join(REPO, ".jax_cache")
        ),
        # One BLAS / OpenMP thread: scipy's sqrtm and k-means oversubscribe 2 shared cores.
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-m", "launch.evaluate_synthetic", *flags]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_entry_point_writes_metrics_report_and_figures(
    shipped_data_dir, synthetic_folder, tmp_path
):
    output = tmp_path / "quality"
    done = run(
        "--real=pneumonia_mnist:test",
        f"--synthetic={synthetic_folder}",
        "--features=pixels",
        f"--output={output}",
        f"--data_dir={shipped_data_dir}",
        f"--cache_dir={tmp_path / 'cache'}",
        "--kid_subsets=10",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    for key in (*quality.DIRECTIONS, "kid_std_err", "kmeans_ari", "kmeans_nmi"):
        assert isinstance(metrics[key], float), key
    for name in CLASSES:
        block = metrics["per_class"][name]
        assert all(isinstance(block[key], float) for key in quality.DIRECTIONS)
    assert metrics["sizes"]["real"] == 468 and metrics["sizes"]["synthetic"] == 44
    # 44 synthetic images in 256-d features: the small-sample caveats reach the console (#19).
    assert metrics["warnings"], "expected small-sample warnings"
    for message in metrics["warnings"]:
        assert f"caveat: {message}" in done.stderr
    assert metrics["sizes"]["train"] == 2428  # default --real_train: the train split
    assert metrics["sizes"]["synthetic_per_class"] == {"normal": 20, "pneumonia": 24}
    assert metrics["data"]["train"] == "pneumonia_mnist/subset_r28:train"
    assert metrics["extractor"]["spec"] == "pixels:16" and metrics["seed"] == 0
    assert metrics["synthetic_provenance"]["generator"] == "ddpm"
    assert "class_structure" in metrics and "pooled/silhouette" in metrics["class_structure"]
    # The four copied training images (synthetic 40..43: normal/ is read first) are exact
    # copies; one real val image also falls under the near-copy threshold at 16 px pixels.
    closest = metrics["memorisation"]["closest_pairs"][:4]
    assert {p["synthetic"] for p in closest} == {40, 41, 42, 43}
    # Exact copies, up to float32 rounding: a copy sits at another batch position than its
    # original, and XLA CPU's vectorised kernels may round a row differently there.
    assert [p["distance"] for p in closest] == pytest.approx([0.0] * 4, abs=1e-5)
    assert 4 / 44 <= metrics["memorisation_rate"] <= 6 / 44
    assert metrics["per_class"]["pneumonia"]["memorisation_rate"] >= 4 / 24
    report = (output / "report.md").read_text()
    assert "| all |" in report and "nearest_pairs.png" in report
    for name in ("embedding_pca.png", "samples_normal.png", "samples_pneumonia.png"):
        assert (output / name).stat().st_size > 0
    assert (output / "nearest_pairs.png").stat().st_size > 0
    assert len(os.listdir(tmp_path / "cache")) == 3  # real, synthetic, train features
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["fid"] == pytest.approx(metrics["fid"])


def test_missing_weights_fail_before_any_compute(tmp_path):
    """One subprocess (each costs seconds); the other spec errors: tests/test_features.py."""
    done = run(
        "--real=pneumonia_mnist:test",
        f"--synthetic={tmp_path}",
        "--features=inception:/nonexistent/pt_inception.pth",
        f"--output={tmp_path / 'out'}",
        # A data_dir that does not exist: reading any data would fail differently.
        f"--data_dir={tmp_path / 'no_data'}",
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "releases/download/fid_weights/pt_inception-2015-12-05" in done.stderr
    assert not (tmp_path / "no_data").exists()  # no dataset was read or prepared
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_folder_classes_follow_the_real_order_and_unknown_ones_fail(synthetic_folder, tmp_path):
    image_set = quality.load_image_folder(synthetic_folder, class_names=CLASSES[::-1])
    assert image_set.class_names == CLASSES[::-1]
    assert np.bincount(image_set.labels).tolist() == [24, 20]  # pneumonia first now
    assert image_set.info["provenance"]["generator"] == "ddpm"
    (tmp_path / "covid").mkdir()
    (tmp_path / "covid" / "a.png").write_bytes(imageio.encode_png(image_set.images[0]))
    with pytest.raises(ConfigError, match="covid"):
        quality.load_image_folder(tmp_path, class_names=CLASSES)


@pytest.mark.parametrize("method", quality.EMBEDDINGS)
def test_embeddings_are_two_dimensional(method):
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert quality.embed_2d(x, method).shape == (40, 2)
