"""`python -m benchmarks.compare --tiny` produces its table and JSON (never a timed test)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import _common

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("torch", "torchvision", "diffusers")),
    reason="needs the torch extra (torch, torchvision, diffusers)",
)


def test_compare_tiny_table_and_json(tmp_path):
    out = tmp_path / "compare.json"
    env = _common.worker_env(
        {
            "XLA_FLAGS": _common.xla_flags_with_devices(1),
            "JAX_PLATFORMS": "cpu",
            # As the test suite: fast compiles (the figures are not the point here).
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--tiny", "--steps=1", "--warmup=0",
         f"--json_out={out}"],
        cwd=_common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ours/peer" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    whats = [row["what"] for row in rows]
    assert len(rows) == 5, whats
    for needle in ("train step, small stem", "mid fade", "DDPM train", "DDIM", "feature"):
        assert any(needle in what for what in whats), (needle, whats)
    for row in rows:
        assert row["ours_images_per_s"] > 0 and row["peer_images_per_s"] > 0
        assert row["ratio"] > 0 and row["ours_compile_s"] >= 0
        assert row["model"] in done.stdout
    assert os.path.exists(out)
