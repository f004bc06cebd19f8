"""A run never loses, mixes or fakes work: an output folder belongs to one run (a new run refuses one
that holds a run, --resume refuses changed settings, a second process is refused), every setting is
checked before any work, Ctrl-C stops with one line and a checkpoint that resumes exactly, and
--eval-every evaluates when it says."""

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ask  # noqa: E402
import extract_features  # noqa: E402
import finetune  # noqa: E402
import pretrain  # noqa: E402
import reproduce  # noqa: E402
from toy import make_toy_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def pre(toy, out, *extra):
    return ["--unaligned", "--toy-root", toy, "--out", str(out), "--cache-dir", os.path.join(toy, "cache"),
            "--batch-size", "8", "--log-every", "1", "--eval-batches", "1", "--max-steps", "6", *extra]


def ft(toy, out, *extra):
    return ["--task", "vqa", "--toy-root", toy, "--out", str(out), "--batch-size", "8", "--epochs", "0.3",
            "--min-answer-count", "1", "--log-every", "1", *extra]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# an output folder belongs to one run


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_a_new_run_refuses_a_folder_that_holds_one(toy, tmp_path, script):
    main, argv = (pretrain.main, pre) if script == "pretrain" else (finetune.main, ft)
    main(argv(toy, tmp_path))
    kept = {f: read(tmp_path / f) for f in ("ckpt.pt", "log.jsonl", "args.json")}
    with pytest.raises(SystemExit, match=r"^--out .* holds a run already \(args.json, log.jsonl, ckpt.pt.*\): give "
                                         r"--resume to go on with it, another --out, or --overwrite to replace it$"):
        main(argv(toy, tmp_path, "--seed", "1"))
    assert {f: read(tmp_path / f) for f in kept} == kept  # nothing overwritten, nothing appended
    (tmp_path / "ckpt-7.pt").write_bytes(kept["ckpt.pt"])  # as pretrain.py --keep-checkpoints keeps them
    main(argv(toy, tmp_path, "--seed", "1", "--overwrite"))  # replaced, as asked: one run's log
    assert json.loads(read(tmp_path / "args.json"))["args"]["seed"] == 1
    assert not (tmp_path / "ckpt-7.pt").exists()  # the old run's kept checkpoints go with it
    assert read(tmp_path / "ckpt.pt") != kept["ckpt.pt"]
    steps = [r["step"] for r in log(tmp_path) if "step" in r]
    assert steps == sorted(set(steps))


def test_resume_refuses_changed_settings_and_a_folder_without_a_checkpoint(toy, tmp_path):
    pretrain.main(pre(toy, tmp_path / "a"))
    saved = read(tmp_path / "a" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"ckpt.pt: saved by a run with other settings: --unaligned True \(now False\), "
                                         r"--aligned False \(now True\), --lr 0.001 \(now 0.01\); resume with"):
        pretrain.main([a for a in pre(toy, tmp_path / "a", "--resume", "--lr", "1e-2") if a != "--unaligned"]
                      + ["--aligned"])
    assert read(tmp_path / "a" / "ckpt.pt") == saved
    pretrain.main(pre(toy, tmp_path / "a", "--resume", "--log-every", "2"))  # how often it logs may change
    with pytest.raises(SystemExit, match=r"^.*/b/ckpt.pt: checkpoint not found; --resume goes on with the run in --out$"):
        pretrain.main(pre(toy, tmp_path / "b", "--resume"))
    with pytest.raises(SystemExit, match=r"^--resume and --overwrite: choose one"):
        pretrain.main(pre(toy, tmp_path / "a", "--resume", "--overwrite"))
    assert not os.path.exists(tmp_path / "b")


def test_a_second_process_on_a_folder_in_use_is_refused(toy, tmp_path):
    os.makedirs(tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "f.write('4242'); f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "busy" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for main, argv in ((pretrain.main, pre), (finetune.main, ft)):
            with pytest.raises(SystemExit, match=r"^--out .*busy is in use by another run \(process 4242\): wait for "
                                                 r"it to end, or give another --out$"):
                main(argv(toy, tmp_path / "busy"))
            assert os.listdir(tmp_path / "busy") == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    pretrain.main(pre(toy, tmp_path / "busy"))  # the holder is gone: its lock file alone does not stop a run
    with open(tmp_path / "busy" / ".lock") as f:  # and the run let go of the lock when it ended
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_reproduce_goes_on_with_a_killed_run_through_these_rules(tmp_path):
    assert reproduce.again(str(tmp_path / "new")) == []
    os.makedirs(tmp_path / "early")
    (tmp_path / "early" / "args.json").write_text("{}")  # killed before its first checkpoint
    assert reproduce.again(str(tmp_path / "early")) == ["--overwrite"]
    (tmp_path / "early" / "ckpt.pt").write_bytes(b"")
    assert reproduce.again(str(tmp_path / "early")) == ["--resume"]


# -----------------------------------------------------------------------------
# every setting checked before any work: one line naming the flag and the value, exit 2, nothing written

SETTINGS = [
    ("pretrain", "--max-steps 0", "--max-steps 0 is not a whole number above 0"),
    ("pretrain", "--batch-size 0", "--batch-size 0 is not a whole number above 0"),
    ("pretrain", "--batch-size -8", "--batch-size -8 is not a whole number above 0"),
    ("pretrain", "--grad-accum 0", "--grad-accum 0 is not a whole number above 0"),
    ("pretrain", "--lr nan", "--lr nan is not a number, 0 or more"),
    ("pretrain", "--lr -1.0", "--lr -1.0 is not a number, 0 or more"),
    ("pretrain", "--warmup 1.5", "--warmup 1.5 is not a share in [0, 1)"),
    ("pretrain", "--log-every 0", "--log-every 0 is not a whole number above 0"),
    ("pretrain", "--save-every -1", "--save-every -1 is not a whole number above 0"),
    ("pretrain", "--eval-every -5", "--eval-every -5 is not a whole number, 0 or more"),
    ("pretrain", "--workers -1", "--workers -1 is not a whole number, 0 or more"),
    ("pretrain", "--text-rate 0", "--text-rate 0 is not a fraction in (0, 1]"),
    ("pretrain", "--max-steps ten", "--max-steps ten is not a whole number above 0"),
    ("finetune", "--epochs -1", "--epochs -1 is not a number above 0"),
    ("finetune", "--epochs 0", "--epochs 0 is not a number above 0"),
    ("finetune", "--batch-size 0", "--batch-size 0 is not a whole number above 0"),
    ("finetune", "--lr -0.0003", "--lr -0.0003 is not a number, 0 or more"),
    ("finetune", "--train-fraction 0", "--train-fraction 0 is not a fraction in (0, 1]"),
    ("finetune", "--hard-negatives 0", "--hard-negatives 0 is not a whole number above 0"),
    ("finetune", "--eval-batch-size 0", "--eval-batch-size 0 is not a whole number above 0"),
    ("reproduce", "--seeds 0", "--seeds 0 is not a whole number above 0"),
    ("reproduce", "--jobs 0", "--jobs 0 is not a whole number above 0"),
    ("reproduce", "--budget pretrain=0", "--budget pretrain=0: a budget is above 0"),
    ("extract_features", "--workers -1", "--workers -1 is not a whole number, 0 or more"),
    ("extract_features", "--batch-size 0", "--batch-size 0 is not a whole number above 0"),
    ("ask", "--top 0", "--top 0 is not a whole number above 0"),
]
MAINS = {"pretrain": (pretrain, pre), "finetune": (finetune, ft),
         "reproduce": (reproduce, lambda toy, out: ["--toy-root", toy, "--out", str(out)]),
         "extract_features": (extract_features, lambda toy, out: ["--weights", "none", "--images", toy, "--out", str(out)]),
         "ask": (ask, lambda toy, out: [str(out), "photo.png", "what is it?"])}


@pytest.mark.parametrize("script, flags, line", SETTINGS, ids=[f"{s} {f}" for s, f, _ in SETTINGS])
def test_a_setting_out_of_range_is_one_line(toy, tmp_path, capsys, script, flags, line):
    module, argv = MAINS[script]
    with pytest.raises(SystemExit) as e:
        module.main(argv(toy, tmp_path / "out") + flags.split())
    prog = module.parser.prog  # the script's name when it is run as a script
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{prog}: error: {line} (see {prog} -h)"]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("out", ["/proc/uvisualbert/out", "{file}/out", ""])
def test_an_out_that_cannot_be_made_is_one_line_before_any_work(toy, tmp_path, out):
    (tmp_path / "file").write_text("a file\n")
    out = out.format(file=tmp_path / "file")
    for main, argv in ((pretrain.main, pre), (finetune.main, ft)):
        with pytest.raises(SystemExit, match=r"^--out .*(cannot be made|is a file, where a folder is wanted|an empty path)"):
            main(argv(toy, out))


# -----------------------------------------------------------------------------
# Ctrl-C: one line, a checkpoint at the step it stopped, and a resume that goes on exactly


def stopped_by(sig, toy, tmp_path, script, argv):
    """`script` run whole into tmp_path/whole, then into tmp_path/split stopped by `sig` a few steps in:
    (its exit code, stderr), its main and the flags of both runs."""
    main = pretrain.main if script == "pretrain.py" else finetune.main
    many = ["--max-steps", "120"] if script == "pretrain.py" else ["--epochs", "4"]  # a signal at step 3 comes in time
    main(argv(toy, tmp_path / "whole", *many))
    cmd = [sys.executable, script, *argv(toy, tmp_path / "split", *many)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 3/"):  # a few steps in
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return proc, err, main, many


@pytest.mark.parametrize("script, argv", [("pretrain.py", pre), ("finetune.py", ft)])
def test_ctrl_c_saves_and_the_resume_is_exact(toy, tmp_path, script, argv):
    proc, err, main, many = stopped_by(signal.SIGINT, toy, tmp_path, script, argv)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    step = int(err.split("stopped at step ")[1].split(":")[0])
    assert err.startswith(f"interrupted: stopped at step {step}: ") and "--resume goes on" in err
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["step"] == step
    assert 3 <= step < 60 and not os.path.exists(tmp_path / "split" / "results.json")
    assert not os.path.exists(tmp_path / "split" / "eval.json")
    main(argv(toy, tmp_path / "split", *many, "--resume"))
    assert log(tmp_path / "split") == log(tmp_path / "whole")  # the same losses, the same results
    if script == "pretrain.py":  # the held-out losses before training are the first run's, not lost
        whole, split = (json.loads(read(tmp_path / d / "eval.json")) for d in ("whole", "split"))
        assert split["before"] is not None and split == whole


@pytest.mark.parametrize("script, argv", [("pretrain.py", pre), ("finetune.py", ft)])
def test_sigterm_saves_and_the_resume_is_exact(toy, tmp_path, script, argv):
    """SLURM, Kubernetes and `timeout` stop a job with SIGTERM: the step saved, one line, exit code 143
    (128 + SIGTERM), and --resume goes on exactly."""
    proc, err, main, many = stopped_by(signal.SIGTERM, toy, tmp_path, script, argv)
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    step = int(err.split("stopped at step ")[1].split(":")[0])
    assert err.startswith(f"terminated: stopped at step {step}: ") and "--resume goes on" in err
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["step"] == step
    main(argv(toy, tmp_path / "split", *many, "--resume"))
    assert log(tmp_path / "split") == log(tmp_path / "whole")


# -----------------------------------------------------------------------------
# --eval-every means what it says


def test_eval_every_evaluates_at_its_own_steps(toy, tmp_path):
    pretrain.main(pre(toy, tmp_path, "--max-steps", "10", "--log-every", "5", "--save-every", "100",
                      "--eval-every", "3"))
    assert [r["step"] for r in log(tmp_path) if r.get("phase") == "eval"] == [3, 6, 9]
    assert [r["step"] for r in json.loads(read(tmp_path / "eval.json"))["curve"]] == [3, 6, 9, 10]
