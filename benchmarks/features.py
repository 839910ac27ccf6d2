r"""Throughput of the synthetic-quality stack: feature extraction images/s and metric wall time.

    python -m benchmarks.features --json_out=benchmarks/results/features_cpu.json

Feature extraction (`cxrjax.features.extract`: batches under jax.jit, sharded over the "data"
mesh axis, last batch padded; the cache is off), uint8 28 px grayscale inputs, random weights:
  pixels      pixels:16 (antialiased resize in the jitted function)
  cxr_k12     the pneumonia_mnist preset's DenseNet121-k12 (small stem) at 28 px, 384-d
  cxr_d121    DenseNet121 (ImageNet stem) at 224 px, 1024-d (host resize 28 -> 224 included)
  inception   FID Inception-v3 from an .npz weight file, 299 px (resize in the jitted function)
compile_s is the first batch (trace + compile + run); images/s is over the timed images after it.

Metric time at N real vs N synthetic (and N training) feature vectors, D dims: non-negative
features from a random low-rank ReLU map (shaped like pooled CNN features), synthetic from a
perturbed map, two classes. Each of FD, KID (100 subsets of 1000), PRDC (k = 5),
silhouette / Davies-Bouldin / Calinski-Harabasz (real vs synthetic) and memorisation is timed
once, its JAX kernels compiled in that time (first call); `--full` also times
`quality.compute_metrics` (everything, plus per class and class structure).
Run with one BLAS / OpenMP thread on a shared machine (OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1):
scipy's sqrtm and k-means oversubscribe the cores otherwise. Prints figures and never passes
or fails on time.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import _common

EXTRACTORS = ("pixels", "cxr_k12", "cxr_d121", "inception")
IMAGES = flags.DEFINE_list(
    "images",
    ["pixels=10000", "cxr_k12=2000", "cxr_d121=192", "inception=192"],
    "extractor=number of timed images, for each extractor to measure.",
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch (all devices).")
METRICS_N = flags.DEFINE_integer("metrics_n", 10000, "Real = synthetic = train feature count.")
METRICS_DIM = flags.DEFINE_integer("metrics_dim", 2048, "Feature dimension for the metrics.")
FULL = flags.DEFINE_bool("full", False, "Also time quality.compute_metrics as a whole.")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")


def _random_inception_npz(path: str) -> None:
    import jax

    from cxrjax.models import inception

    rng = np.random.default_rng(0)
    arrays = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(inception.abstract_variables())[0]:
        names = tuple(str(entry.key) for entry in key_path)
        value = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        if names[-1] in ("scale", "var"):
            value = np.abs(value) + 1.0
        if names[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)  # torch layout [O, I, kh, kw]
        arrays[inception.torch_key(names)] = value
    np.savez(path, **arrays)


def _densenet_extractor(name: str, stem: str, resolution: int):
    import jax
    import jax.numpy as jnp

    from configs import classifier as classifier_configs
    from cxrjax import features
    from cxrjax.train import classifier

    model = classifier.make_model(classifier_configs.model_config(name, stem=stem), 2)
    # Random weights of the right shapes (no init compile); throughput ignores their values.
    abstract = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 1)), train=False
        )
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda leaf: (0.05 * rng.standard_normal(leaf.shape) + 1.0 * (leaf.ndim == 1)).astype(
            np.float32
        ),
        abstract,
    )
    return features.classifier_extractor(
        model,
        variables,
        mean=0.5,
        std=0.25,
        resolution=resolution,
        spec=f"cxr:<random {name}>",
        fingerprint=f"random-{name}-{resolution}",
        info={"model": name, "stem": stem},
    )


def make_extractor(kind: str, tmp: str):
    from cxrjax import features

    if kind == "pixels":
        return features.pixels_extractor(16)
    if kind == "cxr_k12":
        return _densenet_extractor("densenet121_k12", "small", 28)
    if kind == "cxr_d121":
        return _densenet_extractor("densenet121", "imagenet", 224)
    path = os.path.join(tmp, "random_inception.npz")
    _random_inception_npz(path)
    return features.make_extractor(f"inception:{path}")


def time_extractor(kind: str, num_images: int, tmp: str) -> dict:
    from cxrjax import features

    extractor = make_extractor(kind, tmp)
    batch = BATCH_SIZE.value
    images = np.random.default_rng(0).integers(0, 256, (num_images + batch, 28, 28), np.uint8)
    start = time.perf_counter()
    features.extract(extractor, images[:batch], batch_size=batch)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = features.extract(extractor, images[batch:], batch_size=batch, log_every_s=60.0)
    elapsed = time.perf_counter() - start
    assert out.shape == (num_images, extractor.dim)
    return {
        "extractor": kind,
        "spec": extractor.spec,
        "dim": extractor.dim,
        "images": num_images,
        "batch_size": batch,
        "compile_s": round(compile_s, 2),
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(num_images / elapsed, 2),
    }


def synthetic_features(n: int, dim: int, seed: int = 0):
    """real, synthetic, train [n, dim] float32 >= 0 and labels: ReLU of a rank-64 random map."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(64, dim)).astype(np.float32) / 8.0
    shifted = mixing + 0.1 * rng.normal(size=mixing.shape).astype(np.float32)
    class_shift = rng.normal(size=(2, 64)).astype(np.float32)

    def draw(m, labels):
        z = rng.normal(size=(len(labels), 64)).astype(np.float32) + class_shift[labels]
        return np.maximum(z @ m, 0.0).astype(np.float32)

    labels = np.arange(n) % 2
    return draw(mixing, labels), draw(shifted, labels), draw(mixing, labels), labels


def time_metrics(n: int, dim: int) -> list[dict]:
    from cxrjax import quality
    from cxrjax.metrics import clustering, generative

    real, synth, train, labels = synthetic_features(n, dim)
    steps = [
        ("frechet_distance", lambda: generative.frechet_distance(real, synth)),
        ("kid (100 x 1000)", lambda: generative.kid(real, synth)),
        ("prdc (k=5)", lambda: generative.prdc(real, synth)),
        ("silhouette/DB/CH real vs synthetic", lambda: clustering.real_vs_synthetic(real, synth)),
        ("memorisation (vs train)", lambda: generative.memorisation(train, synth)),
    ]
    if FULL.value:
        steps.append(
            (
                "quality.compute_metrics (all, per class)",
                lambda: quality.compute_metrics(
                    real, labels, synth, labels, train, class_names=("a", "b")
                ),
            )
        )
    rows = []
    for name, fn in steps:
        start = time.perf_counter()
        fn()
        rows.append(
            {"metric": name, "n": n, "dim": dim, "seconds": round(time.perf_counter() - start, 2)}
        )
        print(f"  {name:45s} {rows[-1]['seconds']:8.1f} s", flush=True)
    return rows


def main(argv):
    del argv
    import jax

    plan = {}
    for item in IMAGES.value:
        kind, _, count = item.partition("=")
        if kind not in EXTRACTORS or not count.isdigit():
            raise app.UsageError(f"--images: expected EXTRACTOR=N with EXTRACTOR in {EXTRACTORS}")
        plan[kind] = int(count)
    env = {**_common.host_environment(), **_common.jax_environment()}
    env["blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"{env['device_kind']} x{jax.device_count()}, load {env['load_average_1min']}")
    extraction = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, count in plan.items():
            row = time_extractor(kind, count, tmp)
            extraction.append(row)
            print(
                f"  {kind:10s} {row['dim']:5d}-d  compile {row['compile_s']:6.1f} s  "
                f"{row['images_per_s']:10.1f} images/s ({row['images']} images)",
                flush=True,
            )
    metrics = time_metrics(METRICS_N.value, METRICS_DIM.value) if METRICS_N.value else []
    result = {
        "benchmark": "features",
        "date": env["date"],
        "environment": env,
        "extraction": extraction,
        "metrics": metrics,
    }
    if JSON_OUT.value:
        _common.write_json(JSON_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
