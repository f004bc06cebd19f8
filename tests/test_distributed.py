"""A 2-process run (gloo, CPU) logs the same losses as 1 process on the same global batch: pretrain.py,
then finetune.py (both DDP), then both with --grad-accum."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from toy import make_toy_world  # noqa: E402


def one_and_two(common, tmp_path, two_extra=()):
    """Run a script's command line as 1 process, then as 2 under torchrun (gloo) with `two_extra` added:
    the 2-process run's output and both runs' log.jsonl records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                          "--out", str(tmp_path / "two"), *two_extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return two, [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]


def test_two_processes_match_one(tmp_path):
    toy = make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03)
    common = ["pretrain.py", "--unaligned", "--toy-root", toy, "--cache-dir", str(tmp_path / "cache"), "--max-steps", "8",
              "--batch-size", "8", "--log-every", "1", "--dropout", "0", "--eval-batches", "1", "--lr", "3e-3"]
    two, logs = one_and_two(common, tmp_path)
    assert "x 2 process(es)" in two.stdout
    assert len(logs[0]) == len(logs[1]) == 8
    kinds = set()
    for a, b in zip(*logs):
        assert a["modality"] == b["modality"]
        kinds.add(a["modality"].split(":")[0])
        for k in a:
            if k not in ("modality", "grad_norm"):
                assert b[k] == pytest.approx(a[k], abs=1e-4, rel=1e-4), (a["step"], k, a[k], b[k])
    assert kinds == {"text", "images", "captions"}  # text and image steps both checked


# finetune.py: the same, for tasks whose steps draw at random (retrieval's negatives, NLVR2's
# task-pretraining masks): each is drawn once for the global batch, then split among the processes
@pytest.mark.parametrize("task, flags", [("vqa", []), ("retrieval", ["--lr", "3e-3"]), ("nlvr2", ["--task-pretrain-epochs", "1"])])
def test_finetune_two_processes_match_one(tmp_path, task, flags):
    toy = make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03)
    common = ["finetune.py", "--task", task, "--toy-root", toy, "--device", "cpu", "--batch-size", "8", "--epochs", "0.4",
              "--log-every", "1", "--dropout", "0", "--min-answer-count", "1", *flags]
    two, logs = one_and_two(common, tmp_path)
    assert "x 2 process(es)" in two.stdout and two.stdout.count("steps per epoch") == 1  # rank 0 alone prints
    steps = [r for r in logs[0] if "step" in r]
    assert len(logs[0]) == len(logs[1]) and len(steps) >= 4 and len({round(r["loss"], 3) for r in steps}) > 1  # the losses move
    for a, b in zip(*logs):
        if "step" in a:
            assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], abs=1e-4, rel=1e-4), (a, b)
        elif a["phase"] == "task_pretrain":  # the dev MLM loss after task-pretraining under 2 processes
            assert a["task_pretrain_epoch"] == b["task_pretrain_epoch"] and b["dev_mlm"] == pytest.approx(a["dev_mlm"], abs=1e-4)
    assert logs[0][-1]["phase"] == logs[1][-1]["phase"] == "eval"
    results = [json.load(open(tmp_path / run / "results.json")) for run in ("one", "two")]
    assert results[0] == results[1]  # every process evaluates the same weights; rank 0 wrote them
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)  # the plain model: no DDP or compile prefixes
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# --grad-accum under DDP: 2 processes of 2 micro-batches each take the step 1 process takes on the
# whole batch (dropout 0, fp32): the same losses, gradient norms and, after the steps, parameters
@pytest.mark.parametrize("script, flags", [("pretrain.py", ["--aligned", "--max-steps", "3", "--eval-batches", "1"]),
                                           ("finetune.py", ["--task", "vqa", "--epochs", "0.3", "--min-answer-count", "1"])])
def test_two_processes_with_micro_batches_match_one(tmp_path, script, flags):
    toy = make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03)
    common = [script, *flags, "--toy-root", toy, "--batch-size", "8", "--log-every", "1", "--dropout", "0", "--device", "cpu"]
    two, logs = one_and_two(common, tmp_path, ["--grad-accum", "2"])
    assert "x 2 process(es)" in two.stdout
    steps = [[r for r in log if "step" in r] for log in logs]
    assert len(steps[0]) == len(steps[1]) >= 2
    for a, b in zip(*steps):
        for k in ("loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    ckpts = [torch.load(tmp_path / run / "ckpt.pt", weights_only=False) for run in ("one", "two")]
    for part in ("model", "head") if script == "finetune.py" else ("model",):
        for k in ckpts[0][part]:
            torch.testing.assert_close(ckpts[1][part][k], ckpts[0][part][k], atol=1e-5, rtol=0, msg=k)


def workers_of(parent):
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if ppid == parent and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers in /proc")
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """A scheduler may signal one process first: the processes vote at each step's end, so all stop after
    the same step, rank 0 saves it, and a resume under torchrun goes on from it."""
    toy = make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03)
    common = ["pretrain.py", "--unaligned", "--toy-root", toy, "--cache-dir", str(tmp_path / "cache"), "--max-steps", "60",
              "--batch-size", "8", "--log-every", "1", "--eval-batches", "1", "--out", str(tmp_path / "two")]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):  # a few steps in: signal rank 1 alone
            os.kill(workers_of(proc.pid)[1], signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    step = int(err.split("terminated: stopped at step ")[1].split(":")[0])
    assert 3 <= step < 60
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)["step"] == step
    logged = [json.loads(line)["step"] for line in open(tmp_path / "two" / "log.jsonl") if '"phase"' not in line]
    assert logged[-1] == step  # every step up to it logged, none after
    more = subprocess.run([*run, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resuming from {tmp_path / 'two' / 'ckpt.pt'} at step {step}" in more.stdout
