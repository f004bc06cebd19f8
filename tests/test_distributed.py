"""A 2-process DDP run (gloo, CPU) logs the same losses as 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402


def test_two_processes_match_one(tmp_path):
    toy = data.make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03)
    common = ["pretrain.py", "--unaligned", "--toy-root", toy, "--cache-dir", str(tmp_path / "cache"), "--max-steps", "8",
              "--batch-size", "8", "--log-every", "1", "--dropout", "0", "--eval-batches", "1", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                          "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in two.stdout
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 8
    kinds = set()
    for a, b in zip(*logs):
        assert a["modality"] == b["modality"]
        kinds.add(a["modality"].split(":")[0])
        for k in a:
            if k not in ("modality", "grad_norm"):
                assert b[k] == pytest.approx(a[k], abs=1e-4, rel=1e-4), (a["step"], k, a[k], b[k])
    assert kinds == {"text", "images", "captions"}  # text and image steps both checked
