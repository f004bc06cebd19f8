"""Faults a real run meets: a first command killed while it makes the toy world, a full disk, a feature
store with NaN in it, a feature no detector should have written, preemption of reproduce.py. Each ends in
one line and no traceback, or recovers by itself; nothing finished is lost. (SIGTERM to the training
scripts: tests/test_guards.py; fp16: tests/test_train.py.)"""

import base64
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import extract_features as ef  # noqa: E402
import finetune  # noqa: E402
import pretrain  # noqa: E402
import storage  # noqa: E402
import toy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def pre(root, out, *extra):
    return ["--unaligned", "--toy-root", root, "--out", str(out), "--cache-dir", os.path.join(root, "cache"),
            "--batch-size", "8", "--log-every", "1", "--eval-batches", "1", "--max-steps", "6", *extra]


def stores(root):
    """Every feature store of a toy world, opened: a store with an image twice (a build that wrote over a
    half-made one) does not open."""
    return [storage.FeatureStore(p) for p in sorted(glob.glob(os.path.join(root, "features", "*")))]


# -----------------------------------------------------------------------------
# the toy world: made aside and moved into place


def test_a_toy_world_build_killed_midway_leaves_nothing_a_later_run_trusts(tmp_path):
    root = str(tmp_path / "world")
    code = f"import toy; toy.make_toy_world({root!r}, scale=0.05)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # until the first store's shard is complete
        if glob.glob(f"{root}*/features/pretrain/*.index.json"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a laptop's lid closed, a terminal gone
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(root, "done"))
    toy.make_toy_world(root, scale=0.05)  # the same command again: it makes the world anew
    assert os.path.exists(os.path.join(root, "done")) and len(stores(root)) == 10  # pre-training 3, the tasks 7
    assert not glob.glob(f"{root}.partial-*")  # the killed build's folder is gone


def test_a_half_made_world_of_an_earlier_version_is_made_again_and_another_folder_refused(tmp_path):
    root = tmp_path / "world"
    (root / "features" / "pretrain").mkdir(parents=True)
    (root / "features" / "pretrain" / "shard-00000.index.json").write_text("{}")  # half made, no "done"
    toy.make_toy_world(str(root), scale=0.03)
    assert len(stores(str(root))) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("not a toy world")
    with pytest.raises(SystemExit, match=r"mine: not a toy world, and not empty; give another --toy-root$"):
        toy.make_toy_world(str(tmp_path / "mine"), scale=0.03)
    assert (tmp_path / "mine" / "thesis.tex").exists()


# -----------------------------------------------------------------------------
# a full disk: /dev/full fails every write with ENOSPC, as a full disk does


def full_disk_at(file):
    """Writes of `file` (through storage.write_atomic's temporary name) fail as on a full disk."""
    os.symlink("/dev/full", f"{file}.{os.getpid()}.tmp")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_file_and_the_last_good_one(world, tmp_path,
                                                                                                   monkeypatch):
    real, calls = storage.save_checkpoint, []

    def save(path, *a, **k):  # the second save finds the disk full
        calls.append(path)
        if len(calls) == 2:
            full_disk_at(path)
        return real(path, *a, **k)

    monkeypatch.setattr(storage, "save_checkpoint", save)
    with pytest.raises(SystemExit) as e:
        pretrain.main(pre(world, tmp_path, "--save-every", "2"))
    ckpt = tmp_path / "ckpt.pt"
    assert str(e.value) == (f"{ckpt}: cannot be written (No space left on device); stopping, the last good "
                            f"checkpoint is {ckpt} (step 2)")
    assert torch.load(ckpt, weights_only=False)["step"] == 2  # the earlier checkpoint, whole
    assert not glob.glob(str(tmp_path / "*.tmp"))  # nothing half written left behind


def test_a_full_disk_at_the_results_is_one_line_and_the_checkpoint_stays(world, tmp_path):
    full_disk_at(tmp_path / "results.json")
    argv = ["--task", "vqa", "--toy-root", world, "--out", str(tmp_path), "--batch-size", "8", "--epochs", "0.3",
            "--min-answer-count", "1"]
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    step = torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"]
    assert str(e.value) == (f"{tmp_path / 'results.json'}: cannot be written (No space left on device); stopping, the "
                            f"last good checkpoint is {tmp_path / 'ckpt.pt'} (step {step})")
    assert not (tmp_path / "results.json").exists() and not glob.glob(str(tmp_path / "*.tmp"))
    finetune.main([*argv, "--resume"])  # with room again, the run ends from its checkpoint
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "vqa"


def tsv(path, n, bad=()):
    """A bottom-up-attention TSV of n one-box images; the features of the rows in `bad` are NaN."""
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    rows = []
    for i in range(n):
        r = dict(img_id=f"im{i}", img_h=10, img_w=10, objects_id=np.array([1]), objects_conf=np.array([0.9], np.float32),
                 attrs_id=np.array([1]), attrs_conf=np.array([0.9], np.float32), num_boxes=1,
                 boxes=np.array([[0, 0, 5, 5]], np.float32), features=np.full((1, 4), np.nan if i in bad else 0.5, np.float32))
        rows.append("\t".join(b64(v) if isinstance(v, np.ndarray) else str(v) for v in (r[k] for k in ef.TSV_FIELDS)))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_a_full_disk_while_extracting_is_one_line_and_the_complete_shards_stay(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    full_disk_at(out / "shard0-00001.index.json")  # the second shard's last file
    with pytest.raises(SystemExit) as e:
        ef.main(["--from-tsv", tsv(tmp_path / "f.tsv", 12), "--out", str(out), "--shard-size", "5"])
    assert str(e.value) == (f"{out / 'shard0-00001.index.json'}: cannot be written (No space left on device); the "
                            f"images of the complete shards in {out} are kept, and the same command goes on")
    assert sorted(storage.FeatureStore(str(out)).ids()) == [f"im{i}" for i in range(5)]  # the first shard, whole
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--out", str(out), "--shard-size", "5"])  # room again
    assert len(storage.FeatureStore(str(out)).ids()) == 12


# -----------------------------------------------------------------------------
# non-finite features: found before the forward, never written


def test_a_store_with_nan_features_stops_the_run_naming_the_store_and_an_image(world, tmp_path):
    root = str(tmp_path / "world")
    shutil.copytree(world, root)
    for f in glob.glob(os.path.join(root, "features", "pretrain", "*.features.npy")):
        x = np.load(f, mmap_mode="r+")
        x[::7] = np.nan  # some regions of most images: a corrupt shard
        x.flush()
    with pytest.raises(SystemExit) as e:
        pretrain.main(pre(root, tmp_path / "out"))
    store = os.path.join(root, "features", "pretrain")
    assert str(e.value).startswith(f"{store}: image 'pt")
    assert "has non-finite features (NaN or infinite): the store is corrupt; extract its images again; stopping, " \
           "no checkpoint was saved yet" in str(e.value)
    assert "non-finite loss" not in str(e.value)


def test_extraction_never_writes_a_non_finite_feature(tmp_path):
    w = storage.FeatureWriter(str(tmp_path / "store"), 4, ["a", "b"])
    box = np.array([[0, 0, 1, 1]], np.float32)
    for bad in (np.nan, np.inf, 1e6):  # 1e6: beyond float16, stored as inf
        with pytest.raises(storage.NonFinite, match=r"^image 'x': non-finite features"):
            w.add("x", np.full((1, 4), bad, np.float32), box, np.array([0]), np.array([0.9], np.float32), 10, 10)
    # a bottom-up TSV row of NaN features is skipped and listed, as a malformed row is
    tsv(tmp_path / "f.tsv", 12, bad={3})
    out = str(tmp_path / "tsv")
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--out", out])
    assert sorted(storage.FeatureStore(out).ids()) == sorted(f"im{i}" for i in range(12) if i != 3)
    [line] = open(os.path.join(out, "skipped.txt")).read().splitlines()
    assert line.startswith(f"{tmp_path / 'f.tsv'} row 4\timage 'im3': non-finite features")


# -----------------------------------------------------------------------------
# reproduce.py preempted: its runs stop where they are, saved, and the same command goes on


def test_sigterm_stops_reproduce_with_one_line_and_the_same_command_goes_on(world, tmp_path):
    out = tmp_path / "out"
    argv = ["reproduce.py", "--toy-root", world, "--out", str(out), "--variants", "U", "--fractions", "1", "--seeds",
            "1", "--budget", "bert=40", "pretrain=4", "vqa=0.3", "nlvr2=0.3", "retrieval=0.3", "refcoco=0.3"]
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "pretrain" / "Base" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.1)  # the toy BERT at its first evaluation, a quarter in
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().startswith("terminated: 0 of ") and len(err.strip().splitlines()) == 1, err
    step = torch.load(out / "pretrain" / "Base" / "ckpt.pt", weights_only=False)["step"]
    assert 10 <= step < 40
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / 'pretrain' / 'Base' / 'ckpt.pt'} at step {step}" in \
        (out / "pretrain" / "Base" / "stdout.txt").read_text()  # resumed, not started over
    evaluated = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"phase"' in line]
    assert evaluated == [10, 20, 30]  # each evaluation logged once
    assert (out / "table.json").exists()
