"""Nothing lost: exact resume, checkpoints that survive kill -9, a clear stop on a non-finite loss;
pretrain.py first, then finetune.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from toy import make_toy_world  # noqa: E402
import common  # noqa: E402
import finetune  # noqa: E402
from model import Config, VisualBERT  # noqa: E402
import tasks  # noqa: E402
import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def args(toy, out, *extra):
    return ["--unaligned", "--toy-root", toy, "--out", str(out), "--cache-dir", os.path.join(toy, "cache"), "--batch-size", "8",
            "--log-every", "1", "--eval-batches", "1", "--max-steps", "16", "--save-every", "8", *extra]


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_killed_and_resumed_run_logs_what_an_uninterrupted_one_does(toy, tmp_path, kill_at):
    pretrain.main(args(toy, tmp_path / "whole"))
    kill_at(pretrain, "train_flops", 11)  # called once per step, after the optimiser step
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args(toy, tmp_path / "split"))
    assert len(log(tmp_path / "split")) == 10  # steps 9 and 10 were logged after the checkpoint at step 8
    pretrain.main(args(toy, tmp_path / "split", "--resume"))
    whole, split = log(tmp_path / "whole"), log(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 17))
    assert whole == split  # same data order, masks, dropout and updates: identical numbers


def test_checkpoint_survives_kill_during_save(toy, tmp_path):
    """kill -9 at random moments of a run that saves at every step: ckpt.pt always loads."""
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain.py", *args(toy, out, "--save-every", "1", "--max-steps", "400", "--model", "small")]
    for delay in (3.0, 3.7, 4.3):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not os.path.exists(out / "ckpt.pt") and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay - 3.0 + 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)  # the previous checkpoint, whole
        assert ckpt["step"] >= 1 and set(ckpt["model"]) == set(VisualBERT(Config(**ckpt["config"])).state_dict())


def test_non_finite_loss_stops_with_one_clear_line(toy, tmp_path, monkeypatch):
    real = VisualBERT.pretrain_loss
    calls = {"n": 0}

    def nan_at_step_5(self, batch):
        calls["n"] += self.training  # held-out evaluation (eval mode) does not count
        sums, counts, right = real(self, batch)
        if calls["n"] == 5 and self.training:
            sums = sums * torch.tensor([float("nan")] + [1.0] * (len(sums) - 1))
        return sums, counts, right

    monkeypatch.setattr(VisualBERT, "pretrain_loss", nan_at_step_5)
    with pytest.raises(SystemExit, match=r"step 5: non-finite loss \(.*nan.*\); stopping, the last good checkpoint is .*ckpt.pt"):
        pretrain.main(args(toy, tmp_path, "--save-every", "2"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4
    assert [r["step"] for r in log(tmp_path)] == [1, 2, 3, 4]


def test_fp16_scaler_skips_a_non_finite_step(toy, tmp_path, monkeypatch):
    real = VisualBERT.pretrain_loss
    calls = {"n": 0}
    seen = {}

    def nan_at_step_3(self, batch):
        calls["n"] += self.training
        if calls["n"] == 3 and "before" not in seen:
            seen["before"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if calls["n"] == 4 and "after" not in seen:
            seen["after"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        sums, counts, right = real(self, batch)
        if calls["n"] == 3 and self.training:
            sums = sums * torch.tensor([float("inf")] + [1.0] * (len(sums) - 1))
        return sums, counts, right

    monkeypatch.setattr(VisualBERT, "pretrain_loss", nan_at_step_3)
    pretrain.main(args(toy, tmp_path, "--dtype", "fp16", "--max-steps", "6"))
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])  # step 3 skipped
    assert [r["step"] for r in log(tmp_path)] == list(range(1, 7))  # and the run went on


# -----------------------------------------------------------------------------
# finetune.py: the same guarantees


def ft_args(toy, out, task, *extra):
    # more than an epoch (a reshuffle after the resume), a checkpoint (step 8) inside a logging window (steps 7-9)
    return ["--task", task, "--toy-root", toy, "--out", str(out), "--batch-size", "8", "--epochs", "1.2", "--log-every", "3",
            "--save-every", "4", "--min-answer-count", "1", *extra]


@pytest.mark.parametrize("task", ["vqa", "retrieval"])  # retrieval draws its negatives from the task's generator
def test_killed_and_resumed_finetune_logs_what_an_uninterrupted_one_does(toy, tmp_path, kill_at, task):
    finetune.main(ft_args(toy, tmp_path / "whole", task))
    kill_at(common, "train_step", 11)  # called once per step
    with pytest.raises(KeyboardInterrupt):
        finetune.main(ft_args(toy, tmp_path / "split", task))
    assert [r["step"] for r in log(tmp_path / "split")] == [3, 6, 9]  # step 9 was logged after the checkpoint at step 8
    finetune.main(ft_args(toy, tmp_path / "split", task, "--resume"))
    whole, split = log(tmp_path / "whole"), log(tmp_path / "split")
    steps = [r["step"] for r in whole if "step" in r]
    assert steps[-1] > 18 and whole[-1]["phase"] == "eval"
    assert whole == split  # same batches, dropout, negatives and updates: identical losses and results
    finetune.main(ft_args(toy, tmp_path / "split", task, "--resume"))  # a finished run: evaluated again, logged once
    assert log(tmp_path / "split") == whole


def test_finetune_non_finite_loss_stops_with_one_clear_line(toy, tmp_path, monkeypatch):
    real = tasks.VQA.loss
    calls = {"n": 0}

    def nan_at_step_5(self, *a):
        calls["n"] += 1
        loss = real(self, *a)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(tasks.VQA, "loss", nan_at_step_5)
    with pytest.raises(SystemExit, match=r"^step 5: non-finite loss nan; stopping, the last good checkpoint is .*ckpt.pt \(step 4\); try a lower --lr$"):
        finetune.main(ft_args(toy, tmp_path, "vqa", "--save-every", "2", "--log-every", "1"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4
    assert [r["step"] for r in log(tmp_path)] == [1, 2, 3, 4]
    calls["n"] = 0
    with pytest.raises(SystemExit, match=r"^step 5: non-finite loss nan; stopping, no checkpoint was saved yet"):
        finetune.main(ft_args(toy, tmp_path / "early", "vqa", "--save-every", "10"))


def test_finetune_fp16_scaler_skips_a_non_finite_step(toy, tmp_path, monkeypatch):
    real = tasks.VQA.loss
    calls, before = {"n": 0}, {}

    def inf_at_step_3(self, model, head, items):
        calls["n"] += 1
        before[calls["n"]] = [t.detach().clone() for t in [*model.parameters(), *head.parameters()]]
        loss = real(self, model, head, items)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(tasks.VQA, "loss", inf_at_step_3)
    finetune.main(ft_args(toy, tmp_path, "vqa", "--dtype", "fp16", "--epochs", "0.25", "--log-every", "1"))
    assert all(torch.equal(a, b) for a, b in zip(before[3], before[4]))  # step 3 skipped
    assert not all(torch.equal(a, b) for a, b in zip(before[4], before[5]))  # step 4 not
    steps = [r["step"] for r in log(tmp_path) if "step" in r]
    assert steps == list(range(1, calls["n"] + 1)) and len(steps) >= 5  # and the run went on
