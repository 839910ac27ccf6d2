"""Synthesis from tiny PGGAN and DDPM workdirs: files, labels, provenance, determinism, and
the image_folder dataset reading them back."""

import json
import os

import numpy as np
import pytest

from configs import ddpm as ddpm_configs
from configs import pggan as pggan_configs
from cxrjax import synthesis
from cxrjax.config import ConfigError
from cxrjax.data import builders, imageio
from cxrjax.train import diffusion_run, gan_run


def _pggan_workdir(data_dir, workdir):
    config = pggan_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.data.update(resolution=8, content_resolution=6)  # 6 px films padded onto 8 px
    config.schedule.update(fade_images=16, stable_images=16)
    gan_run.train_and_evaluate(config, workdir)


def _ddpm_workdir(data_dir, workdir):
    config = ddpm_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.train.update(num_steps=2, checkpoint_every=2, sample_every=0)
    diffusion_run.train_and_evaluate(config, workdir)


def _read_split_labels(data_dir, name, output, resolution):
    labels = []
    for split in ("train", "validation", "test"):
        try:
            source, spec = builders.load(
                "image_folder",
                split,
                data_dir=data_dir,
                folder_name=name,
                manual_dir=output,
                resolution=resolution,
            )
        except builders.DatasetError:
            continue
        labels += [int(source[i]["label"]) for i in range(len(source))]
    return labels, spec


@pytest.mark.parametrize(
    "kind, make, label", [("pggan", _pggan_workdir, "pneumonia"), ("ddpm", _ddpm_workdir, 0)]
)
def test_synthesize_writes_labeled_dataset(shipped_data_dir, tmp_path, kind, make, label):
    workdir = str(tmp_path / "run")
    make(shipped_data_dir, workdir)
    out = tmp_path / "synth"
    options = dict(num_images=6, label=label, seed=3, batch_size=4, steps=2)
    provenance = synthesis.synthesize(kind, workdir, output=str(out), **options)
    names = provenance["class_names"]
    assert names == ["normal", "pneumonia"]
    index = names.index(label) if isinstance(label, str) else label
    files = sorted(os.listdir(out / names[index]))
    assert files == [f"{kind}_s3_{i:06d}.png" for i in range(6)]
    assert provenance["counts"] == {names[index]: 6, names[1 - index]: 0}
    saved = json.loads((out / "provenance.json").read_text())
    assert saved["generator"] == kind and saved["seed"] == 3 and saved["num_images"] == 6
    assert saved["checkpoint_step"] == provenance["checkpoint_step"] > 0
    assert saved["workdir"] == os.path.abspath(workdir)

    again = tmp_path / "again"
    synthesis.synthesize(kind, workdir, output=str(again), **options)
    for name in files:
        first = (out / names[index] / name).read_bytes()
        assert first == (again / names[index] / name).read_bytes()
    # The second synthesis reused the loaded sampler; new files in the run load it again.
    first = synthesis.load_generator(kind, workdir, steps=2)[0]
    assert synthesis.load_generator(kind, workdir, steps=2)[0] is first
    (tmp_path / "run" / "note.txt").write_text("a changed run folder")
    assert synthesis.load_generator(kind, workdir, steps=2)[0] is not first
    resolution = provenance["resolution"]
    assert kind != "pggan" or resolution == 6  # the PGGAN's film, cropped from its canvas
    image = imageio.decode_gray((out / names[index] / files[0]).read_bytes())
    assert image.dtype == np.uint8 and image.shape[:2] == (resolution, resolution)

    data_dir = str(tmp_path / "datasets")
    labels, spec = _read_split_labels(data_dir, f"synth_{kind}", str(out), resolution)
    assert sorted(labels) == [index] * 6
    assert list(spec.class_names) == names and spec.resolution == resolution

    # A folder that holds images: refused, added to (provenance describes every file), or
    # replaced (#19).
    with pytest.raises(ConfigError, match="already holds 7 files"):
        synthesis.synthesize(kind, workdir, output=str(out), **options)
    more = synthesis.synthesize(kind, workdir, output=str(out), **{**options, "seed": 4},
                                mode="append")  # fmt: skip
    saved = json.loads((out / "provenance.json").read_text())
    assert saved == more and saved["num_images"] == 12 and len(saved["sets"]) == 2
    assert saved["counts"][names[index]] == 12 == len(os.listdir(out / names[index]))
    with pytest.raises(ConfigError, match="use another --seed"):
        synthesis.synthesize(kind, workdir, output=str(out), **options, mode="append")
    synthesis.synthesize(kind, workdir, output=str(out), **options, mode="overwrite")
    assert sorted(os.listdir(out / names[index])) == files
    assert json.loads((out / "provenance.json").read_text())["num_images"] == 6

    # A run config without checkpoints: a clear error naming the workdir.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes((tmp_path / "run" / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no checkpoint in " + str(empty)):
        synthesis.load_generator(kind, str(empty))


def test_not_a_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        synthesis.load_generator("ddpm", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kind, make", [("pggan", _pggan_workdir), ("ddpm", _ddpm_workdir)])
def test_exported_generator_samples_like_its_run_and_filters(
    shipped_data_dir, tmp_path, kind, make
):
    """An export (EMA weights only) gives the run's exact images; the judge-filtered synthesis
    keeps only accepted images and records attempts and the acceptance rate."""
    import jax

    workdir = str(tmp_path / "run")
    make(shipped_data_dir, workdir)
    exported = synthesis.export_generator(kind, workdir, str(tmp_path / "export"))
    assert sorted(os.listdir(exported)) == ["config.json", "generator.npz", "results.json"]
    labels = np.array([0, 1, 1, 0], np.int32)
    original, _ = synthesis.load_generator(kind, workdir, steps=2)
    restored, _ = synthesis.load_generator(kind, exported, steps=2)
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(original(key, labels), restored(key, labels))

    # A judge that accepts images whose mean intensity is above the median of a first draw.
    cut = float(np.median(original(key, labels).mean(axis=(1, 2))))

    def judge(images):
        p = (images.mean(axis=(1, 2)) > cut).astype(np.float64) * 0.8 + 0.1
        return np.stack([p, 1.0 - p], axis=1)

    names = ["normal", "pneumonia"]
    provenance = synthesis.synthesize_filtered(
        kind, exported, num_images=3, output=str(tmp_path / "filtered"), intended="normal",
        judge=judge, judge_class_names=names, thresholds={"normal": 0.5}, max_attempts=40,
        seed=1, batch_size=4, steps=2,
    )  # fmt: skip
    filt = provenance["filter"]
    assert filt["attempts"] <= 40 and filt["accepted"] == provenance["num_images"]
    assert filt["accepted"] + filt["shortfall"] == 3
    assert filt["accepted"] <= filt["passed"] <= filt["attempts"]
    assert filt["acceptance_rate"] == pytest.approx(filt["passed"] / filt["attempts"])
    folder = provenance["class_names"][0]
    for path in (tmp_path / "filtered" / folder).glob("*.png"):
        image = imageio.decode_gray(path.read_bytes(), str(path))
        assert judge(image[None])[0, 0] >= 0.5  # every kept image passed the judge

    # A pool (images already drawn, e.g. the unfiltered set) is judged first: its accepted
    # images are kept in order and count as attempts; only the rest is drawn anew.
    size = original(key, labels).shape[1]
    bright, dark = np.full((size, size), 255, np.uint8), np.zeros((size, size), np.uint8)
    pool = np.stack([bright, dark, bright])
    pooled = synthesis.synthesize_filtered(
        kind, exported, num_images=3, output=str(tmp_path / "pooled"), intended="normal",
        judge=judge, judge_class_names=names, thresholds={"normal": 0.5}, max_attempts=40,
        seed=1, batch_size=4, steps=2, pool=pool, pool_source={"seed": 7},
    )  # fmt: skip
    pf = pooled["filter"]
    assert pf["pool"] == {"images": 3, "seed": 7}
    assert pf["attempts"] >= 3 + 1 and pf["accepted"] + pf["shortfall"] == 3
    kept = sorted((tmp_path / "pooled" / folder).glob("*.png"))
    first = [imageio.decode_gray(p.read_bytes(), str(p)) for p in kept[:2]]
    np.testing.assert_array_equal(np.stack(first), np.stack([bright, bright]))
