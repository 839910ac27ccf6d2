"""Scarce subsets and synthetic mixing in the drivers: counts, provenance, hash compatibility."""

import json

import numpy as np
import pytest

import configs.classifier as classifier_configs
import configs.ddpm as ddpm_configs
import configs.pggan as pggan_configs
from cxrjax import config as config_lib
from cxrjax.data import imageio, mixing
from cxrjax.train import classifier_run, diffusion_run, gan_run

# The data fields this change added to each job family's config.
ADDED = {
    "classifier": ("data.keep_class", "data.keep_fraction", "data.keep_seed", "data.synthetic"),
    "pggan": ("data.only_class", "data.keep_class", "data.keep_fraction", "data.keep_seed"),
    "ddpm": ("data.keep_class", "data.keep_fraction", "data.keep_seed"),
}
DRIVERS = {
    "classifier": (classifier_configs, classifier_run),
    "pggan": (pggan_configs, gan_run),
    "ddpm": (ddpm_configs, diffusion_run),
}


@pytest.mark.parametrize("kind", sorted(DRIVERS))
@pytest.mark.parametrize("preset", ["tiny", "pneumonia_mnist"])
def test_new_fields_at_defaults_keep_the_config_hash_of_existing_runs(kind, preset):
    """A config written before the fields existed hashes like today's at their defaults."""
    configs, driver = DRIVERS[kind]
    config = configs.get_config(preset)
    old = config.to_dict()
    for dotted in ADDED[kind]:
        parent, leaf = dotted.rsplit(".", 1)
        config_lib.get(old, parent).pop(leaf)
    old_ignore = tuple(f for f in driver.HASH_IGNORE if f not in ADDED[kind])
    assert config_lib.config_hash(config, ignore=driver.HASH_IGNORE) == config_lib.config_hash(
        old, ignore=old_ignore
    )
    assert mixing.subset_signature(config.data) == ""


def _write_synthetic(folder, count, class_name="normal"):
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / class_name / f"pggan_s0_{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(imageio.encode_png(rng.integers(0, 255, (32, 32), dtype=np.uint8)))
    provenance = {"generator": "pggan", "class_names": ["normal", "pneumonia"]}
    (folder / "provenance.json").write_text(json.dumps(provenance))


def test_classifier_trains_on_scarce_real_plus_synthetic_and_records_it(shipped_data_dir, tmp_path):
    _write_synthetic(tmp_path / "synth", 30)
    config = classifier_configs.get_config("tiny")
    config.data.update(
        data_dir=shipped_data_dir, keep_class="normal", keep_fraction=0.1, keep_seed=0
    )
    config.data.synthetic.update(
        manual_dir=str(tmp_path / "synth"), data_dir=str(tmp_path / "synth_data"), count=20
    )
    config.train.update(num_steps=2, eval_every=0, checkpoint_every=0, select="last")
    config.eval.bootstrap = 0
    results = classifier_run.train_and_evaluate(config, str(tmp_path / "wd"))
    real, *synthetic = results["training_data"]["parts"]
    # The shipped subset has 1214 normal and 1214 pneumonia training images.
    assert real == {
        "name": "real (normal@0.1)",
        "synthetic": False,
        "records": 121 + 1214,
        "per_class": {"normal": 121, "pneumonia": 1214},
    }
    assert all(part["synthetic"] for part in synthetic)
    assert sum(part["records"] for part in synthetic) == 20
    assert sum(part["per_class"]["normal"] for part in synthetic) == 20
    assert results["train_records"] == 121 + 1214 + 20
    assert results["splits_used"] == {
        "training": ["train", "synthetic"],
        "checkpoint_selection": None,
        "threshold": "val",
        "reported": "test",
    }
    assert results["training_data"]["synthetic"]["provenance"]["generator"] == "pggan"
    assert (tmp_path / "wd" / "val_predictions.npz").exists()


def test_classifier_refuses_the_test_split_for_training_or_validation(tmp_path):
    for field in ("train_split", "val_split"):
        config = classifier_configs.get_config("tiny")
        config.data[field] = "test"
        with pytest.raises(config_lib.ConfigError, match=f"data.{field}: must differ"):
            classifier_run.validate(config)
    config = classifier_configs.get_config("tiny")
    config.data.synthetic.update(manual_dir=str(tmp_path), count=3, fraction=0.5)
    with pytest.raises(config_lib.ConfigError, match="not both"):
        classifier_run.validate(config)


def test_ddpm_loads_the_scarce_subset(shipped_data_dir):
    config = ddpm_configs.get_config("tiny")
    config.data.update(data_dir=shipped_data_dir, keep_class="normal", keep_fraction=0.1)
    source, _ = diffusion_run.load_train_split(config.data)
    assert len(source) == 121 + 1214
    config.data.only_class = "normal"
    source, _ = diffusion_run.load_train_split(config.data)
    assert len(source) == 121
