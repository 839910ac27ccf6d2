"""Corrupt input records at training time: a named error, or masked + counted + capped."""

import json
import os

import numpy as np
import pytest
import toy_trainer

from cxrjax.data import imageio, pipeline
from cxrjax.train import loop


def _batches(records, process_count=1, process_index=0, n=16):
    iterator = pipeline.make_train_iterator(
        records,
        toy_trainer.SPEC,
        global_batch_size=8,
        seed=0,
        normalization="unit",
        augment={"enabled": False},
        bad_records="mask",
        process_index=process_index,
        process_count=process_count,
        device_count=2,
    )
    return [next(iterator) for _ in range(n)]


def test_mask_policy_substitutes_the_next_record_masked_whatever_the_process_count():
    records = toy_trainer.make_records(corrupt=(5,))
    clean = _batches(toy_trainer.make_records())
    one = _batches(records)
    masked = [(b, row) for b, batch in enumerate(one) for row in np.flatnonzero(~batch["mask"])]
    assert len(masked) == 2  # 16 batches of 8 = 2 epochs of 64; record 5 once per epoch
    for b, row in masked:
        assert one[b]["index"][row] != 5  # a readable substitute took its place
        assert not np.array_equal(one[b]["image"][row], clean[b]["image"][row])
    for batch, reference in zip(one, clean, strict=True):
        keep = batch["mask"]
        np.testing.assert_array_equal(batch["image"][keep], reference["image"][keep])
    # Two processes read their halves of the same global batches, substitutes included.
    halves = [_batches(records, 2, p) for p in range(2)]
    for b, batch in enumerate(one):
        for key in ("image", "mask", "index"):
            joined = np.concatenate([halves[0][b][key], halves[1][b][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_error_policy_names_the_record(tmp_path):
    with pytest.raises(imageio.CorruptImageError, match=r"toy-005\.png"):
        toy_trainer.train(str(tmp_path), corrupt=(5,))


def test_masked_records_are_counted_and_training_goes_on(tmp_path):
    result = toy_trainer.train(
        str(tmp_path), corrupt=(5,), bad_records="mask", max_bad_fraction=0.05
    )
    assert result["step"] == 12
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    # 96 examples = 1.5 epochs of 64: record 5 came up once or twice, each time counted.
    assert rows[-1]["data/bad_records"] in (1.0, 2.0)
    assert rows[-1]["data/bad_fraction"] == rows[-1]["data/bad_records"] / 96


def test_above_the_allowed_fraction_the_run_stops(tmp_path):
    with pytest.raises(loop.BadRecordsError, match=r"above the allowed fraction 0\.05"):
        toy_trainer.train(
            str(tmp_path), corrupt=tuple(range(0, 64, 8)), bad_records="mask",
            max_bad_fraction=0.05,
        )  # fmt: skip


class _Captured(Exception):
    pass


@pytest.mark.parametrize("job", ["classifier", "pggan", "ddpm"])
def test_trainers_take_the_policy_from_their_config(job, shipped_data_dir, tmp_path, monkeypatch):
    import importlib

    from cxrjax import config as config_lib

    configs = importlib.import_module(f"configs.{job}")
    driver = importlib.import_module(
        {
            "classifier": "cxrjax.train.classifier_run",
            "pggan": "cxrjax.train.gan_run",
            "ddpm": "cxrjax.train.diffusion_run",
        }[job]
    )
    config = configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config.data.bad_records = "skip"
    with pytest.raises(config_lib.ConfigError, match="data.bad_records"):
        driver.validate(config)
    config.data.bad_records = "mask"
    config.data.max_bad_fraction = 1.5
    with pytest.raises(config_lib.ConfigError, match="data.max_bad_fraction"):
        driver.validate(config)
    config.data.max_bad_fraction = 0.2

    def capture(*args, **kwargs):
        raise _Captured(kwargs.get("bad_records"))

    monkeypatch.setattr(pipeline, "make_train_iterator", capture)
    with pytest.raises(_Captured, match="mask"):
        driver.train_and_evaluate(config, str(tmp_path / job))
