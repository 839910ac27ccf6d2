"""Labels, scarcity, real/synthetic mixing and balanced epochs: exact counts, deterministic."""

import numpy as np
import pytest

from cxrjax.data import mixing, sources


class _CountingSource(sources.ArraySource):
    """ArraySource with a batched read that counts calls (as TFDS data sources provide)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched_calls = 0

    def __getitems__(self, indices):
        self.batched_calls += 1
        return [self[i] for i in indices]


def _source(labels, size=4):
    labels = np.asarray(labels)
    return _CountingSource(np.zeros((len(labels), size, size), np.uint8), labels)


def test_read_labels_uses_batched_reads_and_caches(tmp_path):
    labels = np.arange(10) % 3
    source = _source(labels)
    cache = tmp_path / "labels.npy"
    np.testing.assert_array_equal(mixing.read_labels(source, cache, chunk_size=4), labels)
    assert source.batched_calls == 3 and cache.exists()
    np.testing.assert_array_equal(mixing.read_labels(source, cache), labels)
    assert source.batched_calls == 3  # Served from the cache.
    with pytest.raises(ValueError, match="stale"):
        mixing.read_labels(_source(labels[:5]), cache)
    multi = mixing.read_labels(_source(np.eye(3, dtype=np.uint8)[labels]))
    assert multi.dtype == np.float32 and multi.shape == (10, 3)


def test_scarcity_keeps_exact_rounded_fraction_of_chosen_class():
    labels = np.array([0] * 1000 + [1] * 300 + [0] * 15)  # 1015 normal, 300 pneumonia
    names = ("normal", "pneumonia")
    kept = mixing.scarce_indices(labels, {"normal": 0.1}, seed=0, class_names=names)
    assert (labels[kept] == 0).sum() == 102  # round_half_up(101.5)
    assert (labels[kept] == 1).sum() == 300 and np.all(np.diff(kept) > 0)
    same = mixing.scarce_indices(labels, {0: 0.1}, seed=0)
    np.testing.assert_array_equal(kept, same)
    other = mixing.scarce_indices(labels, {0: 0.1}, seed=1)
    assert len(other) == len(kept) and not np.array_equal(other, kept)
    with pytest.raises(ValueError, match="unknown class"):
        mixing.scarce_indices(labels, {"norml": 0.1}, seed=0, class_names=names)


def test_scarcity_multilabel_needs_disjoint_classes():
    labels = np.array([[1, 0, 0]] * 20 + [[0, 1, 1]] * 10, np.float32)
    kept = mixing.scarce_indices(labels, {0: 0.25}, seed=0)
    assert labels[kept][:, 0].sum() == 5 and labels[kept][:, 1].sum() == 10
    with pytest.raises(ValueError, match="overlaps"):
        mixing.scarce_indices(labels, {1: 0.5, 2: 0.5}, seed=0)


def test_mix_fraction_is_exact_and_records_are_tagged():
    real = mixing.Part(_source(np.zeros(90, int)), "real")
    synthetic = mixing.Part(_source(np.ones(100, int)), "ddpm", synthetic=True)
    mixed = mixing.mix(real, synthetic, fraction=0.25, seed=0)
    assert len(mixed) == 120 and mixed.names == ("real", "ddpm")  # 30 synthetic of 120
    flags = np.array([mixed[i]["is_synthetic"] for i in range(len(mixed))])
    assert flags.sum() == 30 and flags[:90].sum() == 0
    record = mixed[100]
    assert record["source"] == 1 and record["id"] == str(record["index"])
    batched = mixed.__getitems__([100, 3, 95])
    assert [int(r["index"]) for r in batched] == [int(mixed[i]["index"]) for i in (100, 3, 95)]
    again = mixing.mix(real, synthetic, fraction=0.25, seed=0)
    np.testing.assert_array_equal(again.parts[1].indices, mixed.parts[1].indices)
    assert len(mixing.mix(real, synthetic, count=7, seed=0)) == 97
    with pytest.raises(ValueError, match="need 810"):
        mixing.mix(real, synthetic, fraction=0.9, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        mixing.mix(real, synthetic, fraction=0.1, count=3, seed=0)


def test_mixed_source_select_labels_follows_indices():
    labels = np.arange(10) % 2
    part = mixing.Part(_source(labels), indices=np.array([1, 3, 4]))
    mixed = mixing.MixedSource([part, mixing.Part(_source(labels[:2]), "b")])
    np.testing.assert_array_equal(mixed.select_labels([labels, labels[:2]]), [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(mixing.read_labels(mixed), [1, 1, 0, 0, 1])


def test_balanced_epoch_rounds_and_cycling():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 3)
    epochs = [mixing.balanced_epoch(labels, 3, 10, seed=0, epoch=e) for e in range(3)]
    for plan in epochs:
        rounds = labels[plan].reshape(10, 3)
        assert all(sorted(r) == [0, 1, 2] for r in rounds)  # Each round: one of each class.
    # The 30 majority records are each used once over three epochs (no repeat before exhaustion).
    majority = np.concatenate([plan[labels[plan] == 0] for plan in epochs])
    assert sorted(majority) == list(range(30))
    np.testing.assert_array_equal(epochs[1], mixing.balanced_epoch(labels, 3, 10, seed=0, epoch=1))
    assert not np.array_equal(epochs[1], mixing.balanced_epoch(labels, 3, 10, seed=1, epoch=1))
    with pytest.raises(ValueError, match="class 3 has no records"):
        mixing.balanced_epoch(labels, 4, 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="multi-label"):
        mixing.balanced_epoch(np.eye(3)[labels], 3, 10, seed=0, epoch=0)


def test_training_subset_keeps_the_scarce_fraction_then_one_class():
    labels = np.array([0] * 20 + [1] * 10)
    source = _source(labels)
    spec = sources.DatasetSpec("toy", ("normal", "pneumonia"))
    assert mixing.training_subset(source, spec, {}) is source  # Nothing set: the source itself.
    data = {"keep_class": "normal", "keep_fraction": 0.25, "keep_seed": 3}
    part = mixing.training_subset(source, spec, data)
    expected = mixing.scarce_indices(labels, {"normal": 0.25}, seed=3, class_names=spec.class_names)
    np.testing.assert_array_equal(part.selected(), expected)
    assert np.sum(labels[part.selected()] == 0) == 5 and np.sum(labels[part.selected()] == 1) == 10
    # Same seed, same subset whatever else is configured; only_class then narrows it.
    normals = mixing.training_subset(source, spec, {**data, "only_class": "normal"})
    np.testing.assert_array_equal(normals.selected(), expected[labels[expected] == 0])
    assert mixing.subset_signature(data) == ":keep=normal@0.25/seed3"
    assert mixing.subset_signature({"only_class": "normal"}) == ":only=normal"
    assert mixing.subset_signature({"keep_class": "", "keep_fraction": 1.0}) == ""
    with pytest.raises(ValueError, match="data.keep_class: 'cat' is not a class"):
        mixing.training_subset(source, spec, {"keep_class": "cat"})
    with pytest.raises(ValueError, match="data.keep_fraction"):
        mixing.training_subset(source, spec, {"keep_class": "normal", "keep_fraction": 0.0})


def test_relabelled_and_part_composition():
    source = _source([0, 0, 1])
    one_class = mixing.Relabelled(source, np.array([1, 1]))
    assert [int(r["label"]) for r in one_class.__getitems__([0, 1, 2])] == [1, 1, 1]
    multi_hot = mixing.Relabelled(source, np.eye(3, dtype=np.float32)[[2, 0]])
    np.testing.assert_array_equal(multi_hot[2]["label"], [1, 0, 0])
    real = mixing.Part(_source([0, 1, 1, 1]), name="real")
    synth = mixing.Part(one_class, name="synthetic")
    mixed = mixing.mix(real, synth, seed=0, count=2)
    labels = mixed.select_labels([np.array([0, 1, 1, 1]), np.array([1, 1, 1])])
    composition = mixing.part_composition(mixed, labels, ("normal", "pneumonia"))
    assert composition == [
        {"name": "real", "synthetic": False, "records": 4,
         "per_class": {"normal": 1, "pneumonia": 3}},
        {"name": "synthetic", "synthetic": True, "records": 2,
         "per_class": {"normal": 0, "pneumonia": 2}},
    ]  # fmt: skip


def test_oversample_repeats_the_kept_scarce_records_evenly_up_to_the_target():
    import ml_collections

    labels = np.array([0] * 100 + [1] * 50)
    part = mixing.Part(list(range(150)), indices=np.array([3, 7, 11, *range(100, 150)]))
    data = ml_collections.ConfigDict(
        dict(keep_class="normal", oversample=dict(balance=0.5, count=0))
    )
    repeats, info = mixing.oversample_config(part, labels, data, ("normal", "pneumonia"), seed=0)
    assert info == {"class": "normal", "kept": 3, "target": 50}
    counts = np.bincount(repeats.selected(), minlength=150)
    assert counts.sum() == 47 and set(np.flatnonzero(counts)) == {3, 7, 11}
    assert counts[[3, 7, 11]].max() - counts[[3, 7, 11]].min() <= 1  # as even as possible
    data.oversample.update(balance=0.0, count=5)
    repeats, info = mixing.oversample_config(part, labels, data, ("normal", "pneumonia"), seed=0)
    assert info["target"] == 8 and len(repeats) == 5
    data.oversample.count = 0
    assert mixing.oversample_config(part, labels, data, ("normal", "pneumonia"), seed=0) == (
        None,
        None,
    )
