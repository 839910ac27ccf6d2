"""Synthetic-image quality: image sets -> features -> every metric -> metrics.json and a report.

  real = quality.load_image_set("pneumonia_mnist:test")
  synth = quality.load_image_set("/tmp/synth_ddpm", class_names=real.class_names,
                                 resolution=real.resolution)
  train = quality.load_image_set("pneumonia_mnist:train")
  metrics = quality.evaluate(real.images, real.labels, synth.images, synth.labels,
                             train.images, "cxr:/runs/cls", class_names=real.class_names,
                             output_dir="/tmp/quality")

Metrics (features from `cxrjax.features`; definitions in `cxrjax.metrics.generative` and
`cxrjax.metrics.clustering`), with the direction that means "more like the real data":

  fid, kid (+ kid_std_err)        distribution distance                         lower
  precision, density              synthetic samples land on the real manifold  higher
  recall, coverage                the real manifold is covered by synthetic     higher
  silhouette (real vs synthetic)  separability of the two sets                 ~0 (lower)
  davies_bouldin (real vs synth)  overlap of the two sets                      higher
  calinski_harabasz (real vs syn) between / within dispersion of the two sets  lower
  memorisation_rate               synthetic samples closer to a training image than the
                                  `memorisation_quantile` of train-train NN distances   lower
  class_structure                 silhouette / DB / CH by class for real, synthetic and
                                  pooled: pooled near real = classes land where they should
  kmeans_ari, kmeans_nmi          k-means fitted on real, synthetic clusters vs intended
                                  class (real_ari / real_nmi: the ceiling)       higher

`per_class` repeats the distribution and real-vs-synthetic metrics within each class (real by
true class, synthetic by intended class) and breaks the memorisation rate down by class.
Nothing here reads flags: `launch.evaluate_synthetic` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrjax import features as features_lib
from cxrjax import fileio, parallel, report
from cxrjax.config import ConfigError
from cxrjax.data import imageio
from cxrjax.metrics import clustering, generative

# Headline keys, in report order, and the direction that means "closer to the real data".
DIRECTIONS = {
    "fid": "lower",
    "kid": "lower",
    "precision": "higher",
    "recall": "higher",
    "density": "higher",
    "coverage": "higher",
    "silhouette": "closer to 0",
    "davies_bouldin": "higher",
    "calinski_harabasz": "lower",
    "memorisation_rate": "lower",
}
DISTRIBUTION_KEYS = tuple(key for key in DIRECTIONS if key != "memorisation_rate")
EMBEDDINGS = ("pca", "tsne")
PROVENANCE_FILE = "provenance.json"


# ----------------------------------------------------------------------------- image sets
@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images uint8 [N, H, W], integer labels [N] indexing `class_names`, and an identity."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])


def _resized(images: np.ndarray, resolution: int | None) -> np.ndarray:
    if resolution is None or images.shape[1:] == (resolution, resolution):
        return images
    return np.stack([imageio.resize_square(image, resolution) for image in images])


def _remap_labels(labels: np.ndarray, names: Sequence[str], target: Sequence[str], what: str):
    """Labels indexing `names` -> labels indexing `target` (matched by class name)."""
    missing = sorted(set(names[i] for i in np.unique(labels)) - set(target))
    if missing:
        raise ConfigError(
            f"{what}: classes {missing} are not among the real classes {list(target)}"
        )
    lookup = np.array([target.index(name) if name in target else -1 for name in names])
    return lookup[labels] if len(labels) else labels


def parse_dataset_split(spec: str) -> tuple[str, str]:
    """'kermany_pneumonia/3class_r128:test' -> ('kermany_pneumonia/3class_r128', 'test')."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise ConfigError(f"expected DATASET:SPLIT (e.g. pneumonia_mnist:test), got {spec!r}")
    return name, split


def load_dataset_split(
    spec: str, *, data_dir: str | None = None, resolution: int | None = None
) -> ImageSet:
    """Every image of one split of a prepared (or shipped) dataset, decoded to uint8."""
    from cxrjax.data import builders, sources

    name, split = parse_dataset_split(spec)
    options = {"data_dir": data_dir} if data_dir else {}
    if resolution is not None and "/" not in name:
        options["resolution"] = resolution
    source, ds_spec = builders.load(name, split, **options)
    if ds_spec.label_kind != sources.MULTICLASS:
        raise ConfigError(
            f"{spec}: synthetic-quality metrics group images by one class label; "
            f"{ds_spec.name} is {ds_spec.label_kind}"
        )
    images, labels = [], []
    for index in range(len(source)):
        record = source[index]
        images.append(imageio.decode_gray(record["image"], f"{spec} record {index}"))
        labels.append(int(record["label"]))
    images = np.stack(images) if images else np.zeros((0, 1, 1), np.uint8)
    return ImageSet(
        images=images,
        labels=np.asarray(labels, np.int32),
        class_names=tuple(ds_spec.class_names),
        name=f"{ds_spec.name}:{split}",
        info={"dataset": ds_spec.name, "split": split},
    )


def load_image_folder(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    resolution: int | None = None,
) -> ImageSet:
    """Every image of a `launch.synthesize` folder: <path>/<class>/*.png (+ provenance.json).

    Labels follow `class_names` (e.g. the real set's) by folder name; without it, the
    provenance's class_names, else the sorted folder names. Images are decoded to grayscale
    and, when `resolution` is given and differs, resized as datasets are prepared
    (center crop, antialiased bicubic).
    """
    from cxrjax.data.builders import common

    root = pathlib.Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"synthetic image folder {root} does not exist")
    provenance = None
    if (root / PROVENANCE_FILE).is_file():
        provenance = json.loads((root / PROVENANCE_FILE).read_text(encoding="utf-8"))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    own_names = list((provenance or {}).get("class_names") or [p.name for p in folders])
    names = tuple(class_names) if class_names is not None else tuple(own_names)
    images, labels = [], []
    for folder in folders:
        files = common.list_images(folder, root)
        if not files:
            continue
        if folder.name not in names:
            raise ConfigError(
                f"{root}: class folder {folder.name!r} is not among the classes {list(names)}"
            )
        for file in files:
            image = imageio.decode_gray(file.read_bytes(), str(file))
            images.append(_resized(image[None], resolution)[0])
            labels.append(names.index(folder.name))
    if not images:
        raise FileNotFoundError(
            f"{root} holds no images in class folders (expected <class>/*.png, as written by "
            "launch.synthesize)"
        )
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ConfigError(f"{root}: images of several sizes {sorted(shapes)}; pass a resolution")
    return ImageSet(
        images=np.stack(images),
        labels=np.asarray(labels, np.int32),
        class_names=names,
        name=str(root),
        info={"folder": str(root), "provenance": provenance},
    )


def load_image_set(
    spec: str,
    *,
    data_dir: str | None = None,
    class_names: Sequence[str] | None = None,
    resolution: int | None = None,
) -> ImageSet:
    """A folder PATH (if it is a directory) or DATASET:SPLIT; labels remapped to `class_names`
    and images resized to `resolution` when given."""
    if os.path.isdir(os.path.expanduser(spec)):
        return load_image_folder(spec, class_names=class_names, resolution=resolution)
    image_set = load_dataset_split(spec, data_dir=data_dir)
    images = _resized(image_set.images, resolution)
    labels = image_set.labels
    names = image_set.class_names
    if class_names is not None:
        labels = _remap_labels(labels, names, tuple(class_names), spec)
        names = tuple(class_names)
    return dataclasses.replace(image_set, images=images, labels=labels, class_names=names)


# ----------------------------------------------------------------------------- metrics
def distribution_metrics(
    real, synth, *, k=5, kid_subset_size=1000, kid_subsets=100, seed=0, chunk_size=1024
):
    """FID, KID (+ std err), PRDC and the real-vs-synthetic cluster scores of two feature sets."""
    kid = generative.kid(
        real, synth, subset_size=kid_subset_size, num_subsets=kid_subsets, seed=seed
    )
    out = {
        "fid": generative.frechet_distance(real, synth),
        "kid": kid["kid"],
        "kid_std_err": kid["kid_std_err"],
    }
    prdc = generative.prdc(real, synth, k=k, chunk_size=chunk_size)
    out.update({key: prdc[key] for key in ("precision", "recall", "density", "coverage")})
    scores = clustering.real_vs_synthetic(real, synth, chunk_size=chunk_size)
    out.update({key: scores[key] for key in clustering.SCORES})
    return out


def to_python(value):
    """numpy scalars -> Python floats / ints for JSON; everything else unchanged."""
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def compute_metrics(
    real,
    real_labels,
    synth,
    synth_labels,
    train=None,
    *,
    class_names: Sequence[str],
    k: int = 5,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    memorisation_quantile: float = 0.01,
    num_pairs: int = 16,
    seed: int = 0,
    chunk_size: int = 1024,
    per_class: bool = True,
) -> dict[str, Any]:
    """Every metric from features: real [N, D], synth [M, D], train [T, D] (None: no
    memorisation check). Labels index `class_names`. Returns a JSON-ready dict (see module
    docstring); MetricWarnings (small sets, rank-deficient covariances) are listed under
    "warnings" instead of being lost in a log."""
    real, synth = np.asarray(real), np.asarray(synth)
    real_labels = np.asarray(real_labels, np.int64)
    synth_labels = np.asarray(synth_labels, np.int64)
    names = tuple(class_names)
    common = dict(
        k=k,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        seed=seed,
        chunk_size=chunk_size,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", generative.MetricWarning)
        metrics: dict[str, Any] = distribution_metrics(real, synth, **common)
        near_copy = None
        if train is not None:
            memo = generative.memorisation(
                train,
                synth,
                quantile=memorisation_quantile,
                num_pairs=num_pairs,
                chunk_size=chunk_size,
            )
            metrics["memorisation_rate"] = memo["near_copy_rate"]
            near_copy = memo["nn_distance"] < memo["threshold"]
            metrics["memorisation"] = {
                "near_copy_rate": memo["near_copy_rate"],
                "threshold": memo["threshold"],
                "quantile": memorisation_quantile,
                "nn_distance_median": float(np.median(memo["nn_distance"]))
                if len(memo["nn_distance"])
                else float("nan"),
                "train_nn_distance_median": float(np.median(memo["real_nn_distance"]))
                if len(memo["real_nn_distance"])
                else float("nan"),
                "closest_pairs": [
                    {"synthetic": int(s), "train": int(t), "distance": float(d)}
                    for (s, t), d in zip(
                        memo["closest_pairs"], memo["closest_distance"], strict=True
                    )
                ],
            }
        else:
            metrics["memorisation_rate"] = None
        structure = clustering.class_structure(
            real, real_labels, synth, synth_labels, chunk_size=chunk_size
        )
        metrics["class_structure"] = {key: to_python(v) for key, v in structure.items()}
        kmeans = clustering.kmeans_agreement(
            real,
            synth,
            synth_labels,
            n_clusters=len(names),
            real_labels=real_labels,
            seed=seed,
        )
        metrics["kmeans"] = {key: to_python(v) for key, v in kmeans.items()}
        metrics["kmeans_ari"] = kmeans["ari"]
        metrics["kmeans_nmi"] = kmeans["nmi"]
        if per_class:
            metrics["per_class"] = {}
            for index, name in enumerate(names):
                r, s = real[real_labels == index], synth[synth_labels == index]
                block = distribution_metrics(r, s, **common)
                block["memorisation_rate"] = (
                    float(np.mean(near_copy[synth_labels == index]))
                    if near_copy is not None and len(s)
                    else None
                )
                block["sizes"] = {"real": int(len(r)), "synthetic": int(len(s))}
                metrics["per_class"][name] = {key: to_python(v) for key, v in block.items()}
    messages = []
    for warning in caught:
        if issubclass(warning.category, generative.MetricWarning):
            messages.append(str(warning.message))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    metrics["warnings"] = sorted(set(messages))
    metrics["sizes"] = {
        "real": int(len(real)),
        "synthetic": int(len(synth)),
        "train": None if train is None else int(len(train)),
        "real_per_class": {n: int(np.sum(real_labels == i)) for i, n in enumerate(names)},
        "synthetic_per_class": {n: int(np.sum(synth_labels == i)) for i, n in enumerate(names)},
    }
    metrics["settings"] = {
        "k": k,
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
        "memorisation_quantile": memorisation_quantile,
    }
    metrics["seed"] = int(seed)
    return {key: to_python(value) for key, value in metrics.items()}


def evaluate(
    real_images,
    real_labels,
    synth_images,
    synth_labels,
    train_images,
    extractor: features_lib.Extractor | str,
    *,
    class_names: Sequence[str],
    data_ids: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    output_dir: str | None = None,
    embedding: str = "pca",
    extra: Mapping[str, Any] | None = None,
    **metric_kwargs,
) -> dict[str, Any]:
    """Features of the three image sets, every metric, and (with `output_dir`) the report.

    Images are uint8 [N, H, W] of one size; labels index `class_names` (synthetic: the
    intended class). `train_images` None skips the memorisation check. `extractor` is an
    Extractor or a spec string (`cxrjax.features`). `data_ids` names the sets ("real",
    "synthetic", "train") in the feature cache and the report; `extra` entries (e.g. the
    synthetic set's provenance) are added to the metrics as given. metric_kwargs go to
    `compute_metrics` (k, kid_subset_size, kid_subsets, memorisation_quantile, ...).
    """
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if isinstance(extractor, str):
        extractor = features_lib.make_extractor(extractor)
    data_ids = dict(data_ids or {})
    start = time.perf_counter()
    sets = {"real": real_images, "synthetic": synth_images, "train": train_images}
    feats = {}
    for role, images in sets.items():
        if images is None:
            continue
        feats[role] = features_lib.extract(
            extractor,
            images,
            batch_size=batch_size,
            data_id=data_ids.get(role, role),
            cache_dir=cache_dir,
        )
    feature_s = time.perf_counter() - start
    metrics = compute_metrics(
        feats["real"],
        real_labels,
        feats["synthetic"],
        synth_labels,
        feats.get("train"),
        class_names=class_names,
        seed=seed,
        **metric_kwargs,
    )
    metrics["extractor"] = extractor.describe()
    metrics["data"] = {role: data_ids.get(role, role) for role in feats}
    metrics["class_names"] = list(class_names)
    metrics["time_s"] = {
        "features": round(feature_s, 2),
        "metrics": round(time.perf_counter() - start - feature_s, 2),
    }
    metrics.update(extra or {})
    if output_dir and parallel.is_main_process():
        write_report(
            output_dir,
            metrics,
            features=feats,
            images={"real": real_images, "synthetic": synth_images, "train": train_images},
            labels={"real": real_labels, "synthetic": synth_labels},
            class_names=class_names,
            embedding=embedding,
            seed=seed,
        )
    return metrics


# ----------------------------------------------------------------------------- report
def embed_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, D] -> [N, 2]: PCA (SVD of the centred data) or t-SNE (scikit-learn, PCA init)."""
    x = np.asarray(x, np.float64)
    if method == "pca":
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:2]
        out = centred @ components.T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    if method == "tsne":
        from sklearn import manifold

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return manifold.TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            x
        )
    raise ConfigError(f"embedding must be one of {EMBEDDINGS}, got {method!r}")


def save_embedding(
    real,
    real_labels,
    synth,
    synth_labels,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    method: str = "pca",
    max_points: int = 3000,
    seed: int = 0,
) -> pathlib.Path:
    """Scatter of real vs synthetic features in 2-D (one embedding fitted on both sets)."""
    rng = np.random.default_rng(seed)
    keep_r = np.sort(rng.permutation(len(real))[:max_points])
    keep_s = np.sort(rng.permutation(len(synth))[:max_points])
    points = embed_2d(np.concatenate([real[keep_r], synth[keep_s]]), method, seed)
    pr, ps = points[: len(keep_r)], points[len(keep_r) :]
    fig = Figure(figsize=(6, 5.5), dpi=120)
    ax = fig.add_subplot()
    markers = "os^vDP*X"
    for index, name in enumerate(class_names):
        marker = markers[index % len(markers)]
        r = pr[np.asarray(real_labels)[keep_r] == index]
        s = ps[np.asarray(synth_labels)[keep_s] == index]
        ax.scatter(*r.T, s=8, marker=marker, color="tab:blue", alpha=0.5, label=f"real {name}")
        ax.scatter(*s.T, s=8, marker=marker, color="tab:orange", alpha=0.5, label=f"synth {name}")
    ax.set(title=f"Features, {method.upper()} (real vs synthetic)", xlabel="1", ylabel="2")
    ax.legend(fontsize="small", markerscale=2)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with fileio.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path


def _headline_row(name: str, block: Mapping[str, Any]) -> dict[str, Any]:
    row = {"set": name, **{key: block.get(key) for key in DIRECTIONS}}
    return row


def markdown_report(metrics: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    """The report.md text: headline and per-class table, class structure, memorisation."""
    columns = {key: f"{key} ({DIRECTIONS[key]})" for key in DIRECTIONS}
    rows = [_headline_row("all", metrics)]
    rows += [_headline_row(name, block) for name, block in metrics.get("per_class", {}).items()]
    sizes = metrics["sizes"]
    extractor = metrics.get("extractor", {})
    lines = [
        "# Synthetic-image quality",
        "",
        f"Features: `{extractor.get('spec', '?')}` ({extractor.get('dim', '?')}-d). "
        f"Real: {sizes['real']} ({metrics.get('data', {}).get('real', '')}); synthetic: "
        f"{sizes['synthetic']} ({metrics.get('data', {}).get('synthetic', '')}); training "
        f"set for memorisation: {sizes['train']} ({metrics.get('data', {}).get('train', '-')}). "
        f"Seed {metrics['seed']}.",
        "",
        report.markdown_table(rows, {"set": "set", **columns}, float_fmt=".4g"),
        f"KID ± standard error over {metrics['settings']['kid_subsets']} subsets: "
        f"{report.format_value(metrics['kid'], '.4g')} ± "
        f"{report.format_value(metrics['kid_std_err'], '.2g')}. "
        "Silhouette, Davies-Bouldin and Calinski-Harabasz treat real and synthetic as two "
        "clusters: a perfect generator leaves them inseparable.",
        "",
        "## Class structure (grouped by class; synthetic by intended class)",
        "",
    ]
    structure = metrics.get("class_structure", {})
    rows = [
        {"group": group, **{s: structure.get(f"{group}/{s}") for s in clustering.SCORES}}
        for group in ("real", "synthetic", "pooled")
    ]
    lines += [
        report.markdown_table(rows, ["group", *clustering.SCORES], float_fmt=".4g"),
        "k-means fitted on real features, synthetic clusters vs intended class: "
        f"ARI {report.format_value(metrics.get('kmeans_ari'))}, "
        f"NMI {report.format_value(metrics.get('kmeans_nmi'))} (real vs true class: ARI "
        f"{report.format_value(metrics.get('kmeans', {}).get('real_ari'))}, NMI "
        f"{report.format_value(metrics.get('kmeans', {}).get('real_nmi'))}).",
        "",
    ]
    memo = metrics.get("memorisation")
    if memo:
        lines += [
            "## Memorisation",
            "",
            f"Near-copy rate {report.format_value(memo['near_copy_rate'], '.4g')}: synthetic "
            f"images closer to a training image than the {memo['quantile']:g} quantile of "
            f"training-image nearest-neighbour distances ({memo['threshold']:.4g}). Median "
            f"synthetic-to-train NN distance {memo['nn_distance_median']:.4g} (train-to-train "
            f"{memo['train_nn_distance_median']:.4g}).",
            "",
        ]
        if memo["closest_pairs"]:
            lines += [
                "Closest pairs (`nearest_pairs.png`: synthetic left, training image right, four "
                "pairs per row):",
                "",
                report.markdown_table(
                    memo["closest_pairs"], ["synthetic", "train", "distance"], float_fmt=".4g"
                ),
            ]
    if metrics.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {message}" for message in metrics["warnings"]] + [""]
    if figures:
        lines += [
            "## Figures",
            "",
            "`samples_<class>.png`: real images in the top row, synthetic below.",
            "",
        ]
        lines += [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(lines)


def write_report(
    output_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    *,
    features: Mapping[str, np.ndarray],
    images: Mapping[str, np.ndarray | None],
    labels: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    embedding: str = "pca",
    seed: int = 0,
    samples_per_class: int = 8,
) -> dict[str, str]:
    """metrics.json, report.md, embedding_<method>.png, samples_<class>.png, nearest_pairs.png.

    Image grids hold exact pixels (no captions, which cost seconds of matplotlib each):
    samples_<class>.png has `samples_per_class` real images in its top row and as many
    synthetic ones below; nearest_pairs.png puts each closest (synthetic, training) pair side
    by side, four pairs per row, closest first (indices and distances in report.md).
    Returns {name: path} of what was written.
    """
    from cxrjax.train import results as results_lib

    output = pathlib.Path(output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    written = {}
    figures = []
    name = f"embedding_{embedding}.png"
    save_embedding(
        features["real"],
        labels["real"],
        features["synthetic"],
        labels["synthetic"],
        class_names,
        output / name,
        method=embedding,
        seed=seed,
    )
    figures.append(name)
    rng = np.random.default_rng(seed)
    for index, class_name in enumerate(class_names):
        real = images["real"][np.asarray(labels["real"]) == index]
        synth = images["synthetic"][np.asarray(labels["synthetic"]) == index]
        real = real[np.sort(rng.permutation(len(real))[:samples_per_class])]
        synth = synth[np.sort(rng.permutation(len(synth))[:samples_per_class])]
        if not len(real) and not len(synth):
            continue
        blank = np.zeros((samples_per_class, *images["real"].shape[1:]), np.uint8)
        rows = [np.concatenate([part, blank])[:samples_per_class] for part in (real, synth)]
        name = f"samples_{_safe(class_name)}.png"
        report.save_image_grid(np.concatenate(rows), output / name, nrow=samples_per_class)
        figures.append(name)
    pairs = (metrics.get("memorisation") or {}).get("closest_pairs") or []
    if pairs and images.get("train") is not None:
        tiles = []
        for pair in pairs:
            tiles += [images["synthetic"][pair["synthetic"]], images["train"][pair["train"]]]
        name = "nearest_pairs.png"
        report.save_image_grid(np.stack(tiles), output / name, nrow=8)
        figures.append(name)
    results_lib.save_results(str(output / "metrics.json"), metrics)
    fileio.write_text(output / "report.md", markdown_report(metrics, figures))
    for name in ["metrics.json", "report.md", *figures]:
        written[name] = str(output / name)
    logging.info("quality report written to %s", output)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
