"""Building blocks of #19, in-process and cheap: atomic files, strict JSON, tolerant JSON lines,
metrics de-duplication on resume, checkpoint checksums, the workdir/config decision."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import struct

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import fileio
from cxrjax.metrics import writer as writer_lib
from cxrjax.train import workdir as workdir_lib


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results.json"
    fileio.write_json(path, {"auc": float("nan"), "x": np.float32(0.5), "n": [np.inf, 1]})
    assert json.loads(path.read_text()) == {"auc": None, "n": [None, 1], "x": 0.5}
    with pytest.raises(RuntimeError), fileio.atomic_write(path) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text())["x"] == 0.5  # untouched
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left
    names = {fileio.temp_path(path) for _ in range(50)}
    assert len(names) == 50 and all(str(os.getpid()) in n for n in names)
    fileio.save_npz(tmp_path / "p.npz", a=np.arange(3))
    assert np.load(tmp_path / "p.npz")["a"].tolist() == [0, 1, 2]


def test_jsonl_torn_line_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4, "a": 1}\n{"step": 8, "a": 2}\n{"step": 8, "b": 3}\n{"step": 1')
    assert fileio.read_jsonl(path)[-1] == {"step": 8, "b": 3}  # torn line skipped
    assert writer_lib.read_history(tmp_path) == [
        {"step": 4, "a": 1},
        {"step": 8, "a": 2, "b": 3},
    ]
    writer = writer_lib.MetricWriter(tmp_path, tensorboard=False, resume_step=4)
    writer.write_scalars(8, {"a": float("nan")})
    writer.close()
    assert path.read_text() == '{"step": 4, "a": 1}\n{"step": 8, "a": null}\n'


@struct.dataclass
class _State:
    params: dict
    step: jnp.ndarray


def test_checksum_catches_a_changed_value_and_nonfinite():
    state = _State({"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16)}, 3)
    paths, sums, finite = checkpoint_lib.fingerprint(state)
    meta = {"checksum": {"algorithm": checkpoint_lib.CHECKSUM_ALGORITHM,
                         "leaves": dict(zip(paths, sums, strict=True))}}  # fmt: skip
    assert all(finite) and "params/w" in paths
    # The restored form (a dict) verifies against the dataclass's checksums.
    checkpoint_lib.verify({"params": dict(state.params), "step": jnp.asarray(3)}, meta, 7)
    flipped = state.params["w"].at[1, 2].set(5.000001)  # one value, a few bits
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"step 7: .*params/w.*checksum"):
        checkpoint_lib.verify(_State({**state.params, "w": flipped}, 3), meta, 7)
    with pytest.raises(checkpoint_lib.CheckpointError, match="non-finite"):
        checkpoint_lib.verify({"w": jnp.array([1.0, jnp.nan])}, {}, 7)  # old checkpoints too


def _config(**overrides):
    config = ml_collections.ConfigDict(
        {"optim": {"lr": 1e-3}, "train": {"log_every": 4, "num_steps": 12}, "eval": {}}
    )
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def test_workdir_decisions(tmp_path):
    workdir = str(tmp_path / "run")
    assert workdir_lib.check(_config(), workdir).state == workdir_lib.NEW
    os.makedirs(os.path.join(workdir, "checkpoints", "6"))
    with pytest.raises(workdir_lib.WorkdirConfigError, match="no config.json"):
        workdir_lib.check(_config(), workdir)
    config_lib.save_json(_config(), os.path.join(workdir, "config.json"))
    assert workdir_lib.check(_config(), workdir).state == workdir_lib.RESUME
    harmless = workdir_lib.check(_config(train__log_every=2), workdir)
    assert [str(d) for d in harmless.differences] == ["train.log_every 4 -> 2"]
    assert config_lib.config_hash(harmless.hash_config(_config(train__log_every=2))) == (
        config_lib.config_hash(_config())
    )
    with pytest.raises(workdir_lib.WorkdirConfigError, match=r"optim.lr 0.001 -> 0.002.*force"):
        workdir_lib.check(_config(optim__lr=2e-3), workdir)
    forced = workdir_lib.check(_config(optim__lr=2e-3), workdir, force_resume=True)
    assert forced.forced and forced.signature_ignore == ("config_hash",)
    # A field added to the configs after the run: off by default, so not a difference.
    assert not workdir_lib.check(_config(eval__new_flag=False), workdir).differences
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"auc": 0.9}, f)
    assert workdir_lib.check(_config(), workdir).results == {"auc": 0.9}
    with pytest.raises(workdir_lib.WorkdirConfigError, match="finished run") as caught:
        workdir_lib.check(_config(optim__lr=2e-3), workdir, force_resume=True)
    assert "--force_resume" not in str(caught.value)
    # --overwrite removes only what runs write.
    (tmp_path / "run" / "notes.txt").write_text("mine")
    decision = workdir_lib.prepare(_config(optim__lr=2e-3), workdir, overwrite=True)
    assert decision.state == workdir_lib.NEW and os.listdir(workdir) == ["notes.txt"]
