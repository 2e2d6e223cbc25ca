"""Embedding a collection with two processes (torchrun, gloo) gives the index one process gives."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from absvl.retrieval import ImageIndex


@pytest.mark.slow
def test_two_process_build_matches_one_process(model_dir, collection, tmp_path):
    build = [
        "-m",
        "absvl.cli",
        "index",
        "build",
        "--model",
        str(model_dir),
        "--images",
        str(collection),
        "--shard-size",
        "3",
        "--batch-size",
        "2",
    ]  # 12 images: 4 shards, two per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *build, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    two = subprocess.run([*torchrun, *build, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("indexed 12 images") == 1  # printed once, by process 0

    a, b = ImageIndex.load(tmp_path / "one"), ImageIndex.load(tmp_path / "two")
    assert a.paths == b.paths and a.fingerprint == b.fingerprint and len(b) == 12
    vectors_a = a.index.reconstruct_n(0, len(a))
    vectors_b = b.index.reconstruct_n(0, len(b))
    np.testing.assert_allclose(vectors_a, vectors_b, atol=1e-5)
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["count"] == 12
    assert not (tmp_path / "two.partial").exists()
