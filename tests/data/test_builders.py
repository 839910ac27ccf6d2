"""TFDS builders on fixture trees in the published layouts, and the shipped PneumoniaMNIST."""

import importlib.resources
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cxrjax.data import builders, imageio, sources
from cxrjax.data.builders import nih_chest_xray14, testing

tfds.disable_progress_bar()
REPO = pathlib.Path(__file__).resolve().parents[2]


def records(builder, split):
    source = builder.as_data_source(split=split)
    return {record["id"].decode(): record for record in (source[i] for i in range(len(source)))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


# --- pneumonia_mnist -------------------------------------------------------------------------


def test_shipped_subset_counts_and_pixels(data_dir):
    builder = builders.prepare("pneumonia_mnist", data_dir=data_dir)
    assert builder.info.config_name == "subset_r28"
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert splits == {"train": 2428, "validation": 270, "test": 468}
    assert builders.class_counts(builder, "train") == {"normal": 1214, "pneumonia": 1214}
    assert builders.class_counts(builder, "val") == {"normal": 135, "pneumonia": 135}
    assert builders.class_counts(builder, "test") == {"normal": 234, "pneumonia": 234}
    assert builder.info.metadata["skipped_corrupt"] == {"count": 0, "files": []}

    source, spec = builders.load("pneumonia_mnist", "test", data_dir=data_dir)
    assert spec == sources.DatasetSpec(
        "pneumonia_mnist/subset_r28", ("normal", "pneumonia"), resolution=28
    )
    path = importlib.resources.files("cxrjax.data.resources") / "pneumoniamnist_subset_28.npz"
    with np.load(str(path)) as arrays:
        images, labels = arrays["test_images"], arrays["test_labels"][:, 0]
    by_id = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    for index in (0, 233, 234, 467):  # Both classes; PNG storage at 28 px is lossless.
        record = by_id[f"test/{index:05d}"]
        np.testing.assert_array_equal(imageio.decode_gray(record["image"]), images[index])
        assert record["label"] == labels[index]


def test_prepare_is_idempotent(data_dir):
    first = builders.prepare("pneumonia_mnist", data_dir=data_dir, resolution=32)
    files = sorted(pathlib.Path(first.data_dir).iterdir())
    stamps = [path.stat().st_mtime_ns for path in files]
    second = builders.prepare("pneumonia_mnist/subset_r32", data_dir=data_dir)
    assert second.data_dir == first.data_dir
    assert [path.stat().st_mtime_ns for path in files] == stamps
    record = second.as_data_source(split="train")[0]
    assert imageio.decode_gray(record["image"]).shape == (32, 32)


def test_medmnist_offline_from_manual_dir(tmp_path):
    data_dir = tmp_path / "out"
    manual = tmp_path / "medmnist"
    path = testing.write_medmnist(manual, 64)
    builder = builders.prepare(
        "pneumonia_mnist", variant="medmnist", resolution=64, manual_dir=manual, data_dir=data_dir
    )
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert splits == {"train": 6, "validation": 2, "test": 4}
    with np.load(path) as arrays:
        expected = arrays["val_images"][1]
    record = records(builder, "validation")["val/00001"]
    np.testing.assert_array_equal(imageio.decode_gray(record["image"]), expected)
    assert record["label"] == 1
    # Other resolutions resize the smallest official file at or above them.
    small = builders.prepare("pneumonia_mnist/medmnist_r48", manual_dir=manual, data_dir=data_dir)
    assert small.info.metadata["source_file"] == "pneumoniamnist_64.npz"
    record = small.as_data_source(split="test")[0]
    assert imageio.decode_gray(record["image"]).shape == (48, 48)


def test_medmnist_missing_or_mismatched_files(tmp_path):
    manual, data_dir = tmp_path / "medmnist", tmp_path / "out"
    testing.write_medmnist(manual, 64, drop_label=True)
    with pytest.raises(builders.DatasetError, match="val_images has 2 images but val_labels has 1"):
        builders.prepare("pneumonia_mnist/medmnist_r64", manual_dir=manual, data_dir=data_dir)
    with pytest.raises(builders.DatasetError) as error:
        builders.prepare("pneumonia_mnist/medmnist_r128", manual_dir=manual, data_dir=data_dir)
    message = str(error.value)
    assert "pneumoniamnist_128.npz is not in manual_dir" in message
    assert "<manual_dir>/pneumoniamnist_128.npz" in message
    assert "https://zenodo.org/records/10519652" in message


# --- kermany_pneumonia -----------------------------------------------------------------------


def test_kermany_splits_by_patient_and_labels(tmp_path):
    data_dir = tmp_path / "out"
    testing.write_kermany(tmp_path)
    builder = builders.prepare(
        "kermany_pneumonia", labels="3class", resolution=32, manual_dir=tmp_path, data_dir=data_dir
    )
    assert builders.spec(builder).class_names == ("normal", "bacteria", "virus")
    by_split = {split: records(builder, split) for split in ("train", "validation", "test")}
    expected = {
        f"{split}/{folder}/{name}": (split, folder, name)
        for split, folder, name in testing.KERMANY_FILES
    }
    assert sorted(by_split["test"]) == sorted(
        key for key, value in expected.items() if value[0] == "test"
    )
    assert sorted([*by_split["train"], *by_split["validation"]]) == sorted(
        key for key, value in expected.items() if value[0] != "test"
    )
    patients = {
        split: {r["patient_id"].decode() for r in recs.values()} for split, recs in by_split.items()
    }
    assert not patients["train"] & patients["validation"]
    # Official val/ patients go to validation with all their train images (person1).
    assert {"IM-0007", "person7", "person1"} <= patients["validation"]
    assert "train/PNEUMONIA/person1_virus_2.jpeg" in by_split["validation"]
    # At least one patient per class folder is carved from train.
    assert patients["validation"] - {"IM-0007", "person7", "person1"}
    for recs in by_split.values():
        for key, record in recs.items():
            _, folder, name = expected[key]
            assert record["label"] == testing.kermany_label3(folder, name)
            assert record["patient_id"].decode() == testing.kermany_patient(name)
            assert imageio.decode_gray(record["image"]).shape == (32, 32)  # RGB JPEGs -> gray.
    counts = builders.class_counts(builder, "test")
    assert counts == {"normal": 2, "bacteria": 1, "virus": 1}


def test_kermany_binary_is_deterministic_for_any_manual_dir_form(tmp_path):
    testing.write_kermany(tmp_path / "a")
    testing.write_kermany(tmp_path / "b", nested=True)  # Kaggle's chest_xray/chest_xray/.
    ids = []
    for manual in (tmp_path / "a", tmp_path / "b" / "chest_xray" / "chest_xray"):
        builder = builders.prepare(
            "kermany_pneumonia",
            resolution=16,
            manual_dir=manual,
            data_dir=tmp_path / f"out_{len(ids)}",
        )
        ids.append({split: sorted(records(builder, split)) for split in builder.info.splits})
        assert builders.class_counts(builder, "test") == {"normal": 2, "pneumonia": 2}
    assert ids[0] == ids[1]


def test_kermany_corrupt_image_fails_or_is_skipped_and_recorded(tmp_path):
    data_dir = tmp_path / "out"
    testing.write_kermany(tmp_path, corrupt=True)
    options = dict(resolution=16, manual_dir=tmp_path, data_dir=data_dir)
    with pytest.raises(
        builders.DatasetError, match=r"(?s)train/NORMAL/IM-0008-0001\.jpeg.*skip_corrupt"
    ):
        builders.prepare("kermany_pneumonia", **options)
    builder = builders.prepare("kermany_pneumonia", skip_corrupt=True, **options)
    assert builder.info.metadata["skipped_corrupt"] == {
        "count": 1,
        "files": ["train/NORMAL/IM-0008-0001.jpeg"],
    }
    total = sum(info.num_examples for info in builder.info.splits.values())
    assert total == len(testing.KERMANY_FILES)
    # The record survives a reload from disk.
    reloaded = tfds.builder_from_directory(builder.data_dir)
    assert reloaded.info.metadata["skipped_corrupt"]["count"] == 1


def test_kermany_mislabelled_file_fails_naming_it(tmp_path):
    data_dir = tmp_path / "out"
    testing.write_kermany(tmp_path, mislabelled=True)
    with pytest.raises(builders.DatasetError, match=r"person9_bacteria_10\.jpeg.*NORMAL/"):
        builders.prepare("kermany_pneumonia", resolution=16, manual_dir=tmp_path, data_dir=data_dir)


@pytest.mark.parametrize("make_dir", [False, True])
def test_kermany_bad_manual_dir_shows_layout_and_publisher(tmp_path, make_dir):
    manual = tmp_path / "nowhere"
    if make_dir:
        testing.write_image(manual / "stray.png", 0)
    with pytest.raises(builders.DatasetError) as error:
        builders.prepare("kermany_pneumonia", manual_dir=manual, data_dir=tmp_path / "out")
    message = str(error.value)
    assert str(manual) in message
    assert "train/PNEUMONIA/person1_bacteria_1.jpeg" in message
    assert "https://data.mendeley.com/datasets/rscbjbr9sj/2" in message
    assert "paultimothymooney/chest-xray-pneumonia" in message


# --- nih_chest_xray14 ------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_nih_labels_fields_and_patient_split(tmp_path, nested):
    testing.write_nih(tmp_path / "nih", nested=nested)
    builder = builders.prepare(
        "nih_chest_xray14", resolution=16, manual_dir=tmp_path / "nih", data_dir=tmp_path / "out"
    )
    spec = builders.spec(builder)
    assert spec.label_kind == sources.MULTILABEL and spec.num_classes == 14
    by_split = {split: records(builder, split) for split in builder.info.splits}
    rows = {row[0]: row for row in testing.NIH_ROWS}
    assert sorted(by_split["test"]) == sorted(
        name for name, row in rows.items() if row[6] == "test"
    )
    assert sorted([*by_split["train"], *by_split["validation"]]) == sorted(
        name for name, row in rows.items() if row[6] == "train_val"
    )
    patients = {split: {r["patient_id"] for r in recs.values()} for split, recs in by_split.items()}
    assert patients["validation"] and not patients["train"] & patients["validation"]
    for recs in by_split.values():
        for name, record in recs.items():
            _, findings, patient, age, sex, view, _, mode = rows[name]
            expected = [finding in findings.split("|") for finding in nih_chest_xray14.FINDINGS]
            np.testing.assert_array_equal(record["label"], np.array(expected, np.int64))
            assert (
                record["patient_id"],
                record["age"],
                record["sex"],
                record["view_position"],
            ) == (
                str(patient).encode(),
                age,
                sex.encode(),
                view.encode(),
            )
            pixels = imageio.decode_gray(record["image"])
            assert pixels.shape == (16, 16)
            assert 40 < pixels.mean() < 200, (name, mode)  # 16-bit and RGBA scaled, not clipped.
    counts = builders.class_counts(builder, "test")
    assert counts["No Finding"] == 1 and counts["Effusion"] == 1 and counts["Edema"] == 1


def test_nih_label_files_disagreeing_with_images_fail(tmp_path):
    options = dict(resolution=16, data_dir=tmp_path / "out")
    testing.write_nih(tmp_path / "a", drop_image="00000004_000.png")
    with pytest.raises(builders.DatasetError, match=r"line 7 \(00000004_000\.png\).*missing"):
        builders.prepare("nih_chest_xray14", manual_dir=tmp_path / "a", **options)
    testing.write_nih(tmp_path / "b", extra_listed="00000099_000.png")
    with pytest.raises(builders.DatasetError, match=r"train_val_list.txt line 10 .*not in the csv"):
        builders.prepare("nih_chest_xray14", manual_dir=tmp_path / "b", **options)
    testing.write_nih(tmp_path / "c")
    (tmp_path / "c" / "Data_Entry_2017.csv").unlink()
    with pytest.raises(builders.DatasetError) as error:
        builders.prepare("nih_chest_xray14", manual_dir=tmp_path / "c", **options)
    assert "train_val_list.txt" in str(error.value)
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in str(error.value)


def test_nih_corrupt_png_skipped_with_count(tmp_path):
    testing.write_nih(tmp_path / "nih", corrupt=True)
    options = dict(resolution=16, manual_dir=tmp_path / "nih", data_dir=tmp_path / "out")
    with pytest.raises(builders.DatasetError, match=testing.NIH_CORRUPT):
        builders.prepare("nih_chest_xray14", **options)
    builder = builders.prepare("nih_chest_xray14", skip_corrupt=True, **options)
    assert builder.info.metadata["skipped_corrupt"]["count"] == 1
    assert builder.info.metadata["skipped_corrupt"]["files"] == [f"images/{testing.NIH_CORRUPT}"]


# --- image_folder ----------------------------------------------------------------------------


def test_image_folder_carves_splits_and_records_provenance(tmp_path):
    provenance = {"generator": "ddpm", "checkpoint_step": 1200, "seed": 3}
    folder = testing.write_image_folder(
        tmp_path / "synth", {"": {"normal": 5, "pneumonia": 10}}, provenance=provenance
    )
    source, spec = builders.load(
        "image_folder", "train", manual_dir=folder, data_dir=tmp_path / "out", resolution=16
    )
    builder = builders.prepare(
        "image_folder", manual_dir=folder, data_dir=tmp_path / "out", resolution=16
    )
    assert spec.class_names == ("normal", "pneumonia") and spec.name.startswith(
        "image_folder/folder_"
    )
    assert builder.info.metadata["provenance"] == provenance
    # Per class: test 10% (at least 1), validation 10% (at least 1), train the rest.
    assert builders.class_counts(builder, "test") == {"normal": 1, "pneumonia": 1}
    assert builders.class_counts(builder, "validation") == {"normal": 1, "pneumonia": 1}
    assert builders.class_counts(builder, "train") == {"normal": 3, "pneumonia": 8}
    ids = {split: set(records(builder, split)) for split in builder.info.splits}
    assert len(set.union(*ids.values())) == 15 and len(source) == 11
    # Another folder with the same content gets its own config, no collision.
    other = testing.write_image_folder(tmp_path / "other", {"": {"normal": 2, "pneumonia": 2}})
    other_builder = builders.prepare(
        "image_folder", manual_dir=other, data_dir=tmp_path / "out", resolution=16
    )
    assert other_builder.data_dir != builder.data_dir


def test_image_folder_split_folders_class_names_and_staleness(tmp_path):
    counts = {"train": {"pneumonia": 4}, "test": {"pneumonia": 2}}
    folder = testing.write_image_folder(
        tmp_path / "synth", counts, provenance={"class_names": ["normal", "pneumonia"]}
    )
    options = dict(manual_dir=folder, data_dir=tmp_path / "out", resolution=8, folder_name="synth")
    builder = builders.prepare("image_folder", **options)
    assert builder.info.config_name == "synth_r8"
    # class_names from provenance.json: the only folder keeps label 1, like the real data.
    assert builders.class_counts(builder, "train") == {"normal": 0, "pneumonia": 3}
    assert builders.class_counts(builder, "validation") == {"normal": 0, "pneumonia": 1}
    assert {int(r["label"]) for r in records(builder, "test").values()} == {1}

    testing.write_image(folder / "test" / "pneumonia" / "new.png", 7)
    with pytest.raises(builders.DatasetError, match="changed since it was prepared"):
        builders.prepare("image_folder", **options)
    rebuilt = builders.prepare("image_folder", overwrite=True, **options)
    assert rebuilt.info.splits["test"].num_examples == 3
    assert builders.prepare("image_folder", **options).info.splits["test"].num_examples == 3
    # Read back by name, without the folder.
    source, spec = builders.load("image_folder/synth_r8", "test", data_dir=tmp_path / "out")
    assert len(source) == 3 and spec.class_names == ("normal", "pneumonia")


def test_image_folder_layout_errors(tmp_path):
    folder = testing.write_image_folder(tmp_path / "one", {"": {"normal": 3}})
    with pytest.raises(builders.DatasetError, match="at least two classes"):
        builders.prepare("image_folder", manual_dir=folder, data_dir=tmp_path / "out")
    with pytest.raises(builders.DatasetError, match=r"\['normal'\] .* not among class_names"):
        builders.prepare(
            "image_folder", manual_dir=folder, class_names=["a", "b"], data_dir=tmp_path
        )
    with pytest.raises(builders.DatasetError, match="pass its folder as manual_dir"):
        builders.load("image_folder/never_r8", "train", data_dir=tmp_path / "out")


def test_empty_strings_mean_unset(data_dir):
    # As a ConfigDict spells unset fields (configs/classifier.py: data_dir="", labels="").
    builder = builders.make_builder(
        "pneumonia_mnist", data_dir=data_dir, manual_dir="", labels="", variant="", resolution=28
    )
    assert builder.info.config_name == "subset_r28"


def test_option_errors():
    with pytest.raises(builders.DatasetError, match="unknown dataset 'chexpert'"):
        builders.make_builder("chexpert")
    with pytest.raises(builders.DatasetError, match="has no option 'labels'"):
        builders.make_builder("nih_chest_xray14", labels="3class")
    with pytest.raises(builders.DatasetError, match="contradicts the config name"):
        builders.make_builder("kermany_pneumonia/binary_r64", resolution=128)
    with pytest.raises(builders.DatasetError, match="labels must be one of"):
        builders.make_builder("kermany_pneumonia", labels="5class")


# --- no TensorFlow ---------------------------------------------------------------------------

_NO_TF_SCRIPT = """
import importlib.abc, importlib.machinery, pathlib, sys

# Pretend TensorFlow is installed, and record any attempt to actually load it: tfds and etils
# only probe for it (find_spec), and must never import it on our code paths.
loaded = []
class FakeTensorflow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        loaded.append(module.__name__)
        raise ImportError("tensorflow must not be imported")
sys.meta_path.insert(0, FakeTensorflow())

from cxrjax.data import builders, imageio
from cxrjax.data.builders import testing
root = pathlib.Path(sys.argv[1])
testing.write_kermany(root / "kermany")
testing.write_nih(root / "nih")
testing.write_medmnist(root / "medmnist", 28)
folder = testing.write_image_folder(root / "folder", {"": {"a": 3, "b": 3}}, provenance={"seed": 1})
runs = [
    ("pneumonia_mnist", {}),
    ("pneumonia_mnist/medmnist_r28", {"manual_dir": root / "medmnist"}),
    ("kermany_pneumonia/3class_r16", {"manual_dir": root / "kermany"}),
    ("nih_chest_xray14/r16", {"manual_dir": root / "nih"}),
    ("image_folder", {"manual_dir": folder, "resolution": 16}),
]
for name, options in runs:
    source, spec = builders.load(name, "test", data_dir=root / "out", **options)
    imageio.decode_gray(source[0]["image"])
assert not loaded, loaded
assert "tensorflow" not in sys.modules
print("OK", len(runs))
"""


def test_builds_and_reads_every_dataset_without_tensorflow(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_TF_SCRIPT), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 5" in result.stdout


def test_metadata_is_plain_json(data_dir):
    builder = builders.prepare("pneumonia_mnist", data_dir=data_dir)
    stored = json.loads((pathlib.Path(builder.data_dir) / "metadata.json").read_text())
    assert stored["class_counts"]["validation"] == {"normal": 135, "pneumonia": 135}
    assert stored["resolution"] == 28 and stored["label_kind"] == sources.MULTICLASS
