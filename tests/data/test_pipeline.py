"""Pipelines: determinism, reshuffle, shards, resume, mixing, balance, eval padding."""

import json

import grain
import numpy as np
import pytest

from cxrjax.data import imageio, mixing, pipeline, sources

SPEC = sources.DatasetSpec("toy", ("normal", "pneumonia"), resolution=16)


def _png_records(labels, size=20, prefix="r", seed=0):
    """Records of PNG bytes (stored at 20 px, so the pipeline also resizes to 16)."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), size, size), np.uint8)
    return [
        {"image": imageio.encode_png(image), "label": int(label), "id": f"{prefix}{i}"}
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]


RECORDS = _png_records(np.arange(48) % 2)


def _train(source=RECORDS, **kwargs):
    args = dict(global_batch_size=8, seed=0, process_index=0, process_count=1, device_count=2)
    return pipeline.make_train_iterator(source, SPEC, **(args | kwargs))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batch_layout_and_value_range():
    batch = next(_train())
    assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert set(batch) == set(pipeline.TRAIN_KEYS)


def test_same_seed_same_batches_different_seed_differs():
    first = _take(_train(), 8)  # 8 batches cross the 6-batch epoch boundary.
    _assert_batches_equal(first, _take(_train(), 8))
    other = _take(_train(seed=1), 8)
    assert not np.array_equal(first[0]["index"], other[0]["index"])
    # Augmentation alone (same order) also depends on the seed and changes pixels.
    plain = _take(_train(augment={"enabled": False}), 1)[0]
    np.testing.assert_array_equal(plain["index"], first[0]["index"])
    assert not np.array_equal(plain["image"], first[0]["image"])


def test_each_epoch_is_a_fresh_permutation():
    batches = _take(_train(augment={"enabled": False}), 12)
    epochs = [np.concatenate([b["index"] for b in batches[i : i + 6]]) for i in (0, 6)]
    for order in epochs:
        assert sorted(order) == list(range(48))
    assert not np.array_equal(epochs[0], epochs[1])


def test_shuffled_epochs_smaller_than_a_batch_stay_permutations_and_pickle():
    """A 5-record set under batches of 8 (the CAS case: epochs end inside batches)."""
    import pickle

    parent = grain.MapDataset.range(5)
    ds = pipeline.ShuffledEpochs(parent, seed=3, num_epochs=4)
    order = [ds[i] for i in range(len(ds))]
    assert len(ds) == 20
    epochs = [order[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled, not one order repeated
    assert [pickle.loads(pickle.dumps(ds))[i] for i in range(20)] == order
    assert [pipeline.ShuffledEpochs(parent, seed=3)[i] for i in range(20)] == order
    assert order != [pipeline.ShuffledEpochs(parent, seed=4)[i] for i in range(20)]
    with pytest.raises(ValueError, match="empty"):
        pipeline.ShuffledEpochs(grain.MapDataset.range(0), seed=0)


def test_processes_split_each_global_batch_whatever_the_process_count():
    records = _png_records(np.arange(49) % 2)
    single = _take(_train(records), 14)  # global batch 8, augmentation on, crosses epochs
    halves = [
        _take(_train(records, process_index=p, process_count=2, device_count=2), 14)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        parts = [halves[p][step] for p in range(2)]
        assert parts[0]["image"].shape[0] == 4
        assert not set(parts[0]["index"]) & set(parts[1]["index"])  # disjoint reads
        for key in ("index", "label", "image"):
            np.testing.assert_array_equal(
                np.concatenate([part[key] for part in parts]), whole[key], err_msg=key
            )
    # Every record is seen once per epoch (49 records, epochs of 49 in the global stream).
    stream = np.concatenate([b["index"] for b in single])
    assert sorted(stream[:49]) == list(range(49))


def test_resume_from_state_gives_exactly_the_next_batches(tmp_path):
    uninterrupted = _take(_train(), 7)
    it = _train()
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores.
    resumed = _train()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), uninterrupted[3:])
    # Through Grain's Orbax handler, as the checkpoint manager will call it.
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, args=pipeline.checkpoint_save_args(it))
    restored = handler.restore(tmp_path, args=pipeline.checkpoint_restore_args(_train()))
    _assert_batches_equal(_take(restored, 4), uninterrupted[3:])


def test_worker_processes_give_the_same_batches_and_resume():
    # One pipeline only: starting worker processes costs seconds on a loaded 2-core machine.
    expected = _take(_train(), 5)
    it = _train(num_workers=2)
    try:
        _assert_batches_equal(_take(it, 3), expected[:3])
        state = json.loads(json.dumps(it.get_state()))
        _assert_batches_equal(_take(it, 2), expected[3:])
        it.set_state(state)  # Rewind the live workers to the saved point.
        _assert_batches_equal(_take(it, 2), expected[3:])
    finally:
        it.close()


def test_scarcity_and_mixing_fractions_are_exact_per_epoch():
    labels = np.array([0] * 40 + [1] * 8)
    real_records = _png_records(labels)
    kept = mixing.scarce_indices(labels, {"normal": 0.1}, seed=0, class_names=SPEC.class_names)
    real = mixing.Part(real_records, "real", indices=kept)  # 4 normal + 8 pneumonia
    synthetic = mixing.Part(_png_records(np.zeros(30, int), prefix="s", seed=1), "ddpm", True)
    mixed = mixing.mix(real, synthetic, fraction=1 / 3, seed=0)  # 6 synthetic of 18
    batches = _take(_train(mixed, global_batch_size=6, augment={"enabled": False}), 3)
    flags = np.concatenate([b["is_synthetic"] for b in batches])
    sources_ = np.concatenate([b["source"] for b in batches])
    labels_out = np.concatenate([b["label"] for b in batches])
    assert flags.sum() == 6 and np.array_equal(flags, sources_ == 1)
    assert (labels_out[~flags] == 0).sum() == 4 and (labels_out[~flags] == 1).sum() == 8


def test_balanced_sampling_gives_equal_classes_per_batch():
    labels = np.array([0] * 40 + [1] * 8)
    records = _png_records(labels)
    it = _train(records, balanced=True, augment={"enabled": False}, resolution=8)
    batches = _take(it, 8)  # 3 epochs of 24 (12 per class) and a bit.
    for batch in batches:
        assert np.bincount(batch["label"], minlength=2).tolist() == [4, 4]
    np.testing.assert_array_equal(labels[batches[0]["index"]], batches[0]["label"])
    again = _take(_train(records, balanced=True, augment={"enabled": False}, resolution=8), 8)
    _assert_batches_equal(batches, again)


def test_multilabel_labels_and_balance_rejected():
    spec = sources.DatasetSpec("nih", ("a", "b", "c"), label_kind=sources.MULTILABEL)
    labels = np.eye(3, dtype=np.uint8)[np.arange(12) % 3]
    source = sources.ArraySource(np.zeros((12, 8, 8), np.uint8), labels)
    args = dict(global_batch_size=4, seed=0, resolution=8, process_count=1, process_index=0)
    batch = next(pipeline.make_train_iterator(source, spec, device_count=1, **args))
    assert batch["label"].dtype == np.float32 and batch["label"].shape == (4, 3)
    with pytest.raises(ValueError, match="multi-class labels only"):
        pipeline.make_train_iterator(source, spec, device_count=1, balanced=True, **args)


def test_eval_covers_every_record_once_with_padding_mask():
    records = _png_records(np.arange(45) % 2)
    seen, num_batches = [], []
    for p in range(2):
        ds = pipeline.make_eval_dataset(
            records,
            SPEC,
            global_batch_size=8,
            normalization="imagenet",
            process_index=p,
            process_count=2,
            device_count=2,
        )
        batches = list(ds)
        num_batches.append(len(batches))
        assert all(b["image"].shape == (4, 16, 16, 1) for b in batches)
        mask = np.concatenate([b["mask"] for b in batches])
        index = np.concatenate([b["index"] for b in batches])
        ids = np.concatenate([b["id"] for b in batches])
        assert (index[~mask] == -1).all() and (ids[~mask] == "").all()
        assert [f"r{i}" for i in index[mask]] == ids[mask].tolist()
        seen.extend(index[mask].tolist())
        _assert_batches_equal(batches, list(ds))  # Deterministic, and re-iterable.
    assert num_batches == [6, 6] == [pipeline.eval_num_batches(45, 8, 2)] * 2
    assert sorted(seen) == list(range(45))


def test_batch_size_divisibility_errors():
    with pytest.raises(ValueError, match="process_count 4"):
        _train(global_batch_size=6, process_count=4, device_count=4)
    with pytest.raises(ValueError, match="device_count 4"):
        _train(global_batch_size=6, device_count=4)
    with pytest.raises(ValueError, match="device_count 4"):
        pipeline.make_eval_dataset(RECORDS, SPEC, global_batch_size=6, device_count=4)


def test_corrupt_png_names_the_record():
    records = list(RECORDS[:8])
    records[5] = dict(records[5], image=records[5]["image"][:30], id="bad-005.png")
    with pytest.raises(imageio.CorruptImageError, match=r"bad-005\.png"):
        next(_train(records))


class _CountingSource:
    """RECORDS, counting how often each record is read."""

    def __init__(self, records):
        self.records, self.reads = records, np.zeros(len(records), int)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.records[index]


@pytest.mark.parametrize("augment", [{"enabled": False}, None])
def test_decoding_once_gives_the_same_batches_and_reads_each_record_once(augment):
    streamed, cached = _CountingSource(RECORDS), _CountingSource(RECORDS)
    want = _take(_train(streamed, augment=augment, cache_mb=0), 14)  # over two epochs
    got = _take(_train(cached, augment=augment, cache_mb=1), 14)
    _assert_batches_equal(got, want)
    assert streamed.reads.min() >= 2 and cached.reads.max() == 1
    # Over budget (48 records of 16 x 16 px = 12 KiB > 11 KiB): every read decodes again.
    over = _CountingSource(RECORDS)
    _take(_train(over, cache_mb=11 / 1024), 14)
    assert over.reads.min() >= 2


def test_cached_eval_dataset_gives_the_same_batches_and_decodes_once_over_passes():
    streamed, cached = _CountingSource(RECORDS[:45]), _CountingSource(RECORDS[:45])
    args = dict(global_batch_size=8, process_index=1, process_count=2, device_count=2)
    plain = pipeline.make_eval_dataset(streamed, SPEC, **args)
    kept = pipeline.make_eval_dataset(cached, SPEC, cache_mb=1, **args)
    want = list(plain)
    for _ in range(3):  # periodic validation iterates the same dataset again
        _assert_batches_equal(list(kept), want)
    assert cached.reads.sum() == 22 and cached.reads.max() == 1  # process 1's 22 records
    assert list(plain) and streamed.reads.max() == 2


def test_decoded_fits_counts_gray_bytes():
    assert pipeline.decoded_fits(1024, 32, 1.0)  # 1024 * 32 * 32 bytes = 1 MiB
    assert not pipeline.decoded_fits(1025, 32, 1.0)
    assert not pipeline.decoded_fits(1, 1, 0)


def test_corrupt_png_names_the_record_when_decoding_once():
    records = list(RECORDS[:8])
    records[5] = dict(records[5], image=records[5]["image"][:30], id="bad-005.png")
    with pytest.raises(imageio.CorruptImageError, match=r"bad-005\.png"):
        next(_train(records, cache_mb=1))


def test_describe_batches_reports_real_statistics():
    description = pipeline.describe_batches(_train(), 2, SPEC)
    assert description["fields"]["image"]["shape"] == [8, 16, 16, 1]
    assert sum(description["label_counts"]) == 16 and description["synthetic_fraction"] == 0.0
    assert -1.0 <= description["image"]["min"] < description["image"]["max"] <= 1.0
