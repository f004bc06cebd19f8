"""
What keeps a run's work safe: its output folder (one run each, locked, its args and log), Ctrl-C
taken at a step's end, and the command line checked before any work (paths, and argparse types that
say a bad value in one line). The scripts use it; it imports common.py (which process prints) and storage.py.
"""

import argparse
import contextlib
import fcntl
import glob
import json
import math
import os
import platform
import re
import signal
import sys
import threading

import torch

import common
import storage

# -----------------------------------------------------------------------------
# the run's files


def write_args(args, world):
    """OUT/args.json: the command, every setting, the versions."""
    if common.rank() == 0:
        storage.write_json(os.path.join(args.out, "args.json"), {
            "argv": sys.argv, "args": vars(args), "world_size": world, "torch": torch.__version__,
            "python": platform.python_version()}, indent=1)


class Log:
    """OUT/log.jsonl, a JSON record a line, each on disk once written; only rank 0 writes (`write`).
    An OSError (a full disk) is a WriteError naming the file."""

    def __init__(self, file, mode, write=True):
        self.file, self.f = file, open(file, mode) if write else None

    def write(self, record):
        if self.f is None:
            return
        try:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        except OSError as e:
            raise storage.WriteError(self.file, e) from None

    def close(self):
        if self.f is not None:
            self.f.close()


def one_line(error):
    """An error's message in one line: one raised in a DataLoader worker comes with that worker's
    traceback, its own message on the last line, after the exception's name."""
    lines = str(error).strip().splitlines()
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else str(error)


def records(lines):
    """(line, record) of each line that holds one: a line cut short (a kill, a full disk) is left out."""
    for line in lines:
        with contextlib.suppress(ValueError):
            yield line, json.loads(line)


def read_log(file):
    """log.jsonl's records ([] when there is none yet)."""
    if not os.path.exists(file):
        return []
    with open(file) as f:
        return [r for _, r in records(f)]


def trim_log(file, step, keep_phases=()):
    """--resume: the steps logged after the checkpoint's are done again; drop their lines (and any
    line without a step, such as an evaluation's, unless its phase is in `keep_phases`)."""
    if not os.path.exists(file):
        return
    with open(file) as f:
        kept = [line for line, r in records(f) if r.get("step", step + 1) <= step or r.get("phase") in keep_phases]
    storage.write_atomic(file, lambda f: f.writelines(kept), "w")


# -----------------------------------------------------------------------------
# checks on the command line, before any work


def check_path(path, kind, flag):
    """A path a command-line flag names, checked before any work so that a bad one costs one clear
    line naming it (SystemExit) and writes nothing. kind: "file" (readable, not empty), "folder", "file or
    folder", "checkpoint" (a file, or a Hugging Face BERT folder), "out" (a folder to write: absent or a folder)."""
    where = f"{flag} {path}"
    if not path:
        raise SystemExit(f"{flag} '': an empty path")
    if kind == "out":
        up = os.path.abspath(path)
        while not os.path.exists(up):
            up = os.path.dirname(up)
        if not os.path.isdir(up):
            raise SystemExit(f"{where}: {up} is a file, where a folder is wanted")
        if not os.access(up, os.W_OK):
            raise SystemExit(f"{where}: {up} is not writable")
        if up != os.path.abspath(path):  # a folder beside the first to make, made and removed now: one that
            # cannot be is said before any work; named for this process, so that another one (torchrun's) checking
            # the same --out never sees it come and go
            first = os.path.join(up, os.path.relpath(os.path.abspath(path), up).split(os.sep)[0])
            try:
                os.mkdir(f"{first}.probe-{os.getpid()}")
                os.rmdir(f"{first}.probe-{os.getpid()}")
            except OSError as e:
                raise SystemExit(f"{where}: cannot be made ({e.strerror or e})") from None
        return
    if not os.path.exists(path):
        raise SystemExit(f"{where}: not found")
    if kind == "checkpoint" and os.path.isdir(path):  # a BERT folder: its config, vocabulary and weights
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
        for f in ("config.json", "vocab.txt", *(weights[:1] or ["model.safetensors"])):
            check_path(os.path.join(path, f), "file", f"{flag} (a Hugging Face BERT folder)")
        return
    if os.path.isdir(path):
        if kind in ("file", "checkpoint"):
            raise SystemExit(f"{where}: a folder, where a file is wanted")
        if not os.access(path, os.R_OK | os.X_OK):
            raise SystemExit(f"{where}: cannot be read (permission denied)")
        return
    if kind == "folder":
        raise SystemExit(f"{where}: a file, where a folder is wanted")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise SystemExit(f"{where}: cannot be read ({e.strerror or e})") from None
    if empty:
        raise SystemExit(f"{where}: the file is empty")


def check_paths(args, kinds):
    """check_path on every path of the flags in `kinds` ({dest: kind}) that were given."""
    for dest, kind in kinds.items():
        value = getattr(args, dest, None)
        for path in [value] if isinstance(value, str) else value or []:
            check_path(path, kind, "--" + dest.replace("_", "-"))


# -----------------------------------------------------------------------------
# the output folder belongs to one run, and Ctrl-C stops a run at a step's end

RUN_FILES = ("args.json", "log.jsonl", "ckpt.pt", "eval.json", "results.json", "baseline.json")  # what a run writes


class OutFolder:
    """--out, which belongs to one run. Made, before any work: a new run refuses a folder that holds a
    run already, unless --overwrite; --resume refuses one that holds no checkpoint. make(), once the
    inputs are read: the folder and its lock, OUT/.lock, an flock that the system lets go on any exit
    (a kill too: no lock outlives its process), so a second process on the folder is refused; with
    --overwrite the earlier run's files go then. Rank 0 alone holds it (the others write nothing)."""

    def __init__(self, out, resume=False, overwrite=False):
        self.out, self.resume, self.overwrite, self.lock = out, resume, overwrite, None
        self.saved = None  # the last checkpoint written, (path, step): what a stop names
        if resume and overwrite:
            raise SystemExit("--resume and --overwrite: choose one (go on with the run in --out, or replace it)")
        self.check()

    def check(self):
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(self.out, f))]
        if self.resume and "ckpt.pt" not in held:
            raise SystemExit(f"{os.path.join(self.out, 'ckpt.pt')}: checkpoint not found; --resume goes on with the "
                             f"run in --out")
        if held and not (self.resume or self.overwrite):
            raise SystemExit(f"--out {self.out} holds a run already ({', '.join(held)}): give --resume to go on "
                             f"with it, another --out, or --overwrite to replace it")

    def make(self):
        if common.rank() != 0:
            return
        try:
            os.makedirs(self.out, exist_ok=True)
            self.lock = open(os.path.join(self.out, ".lock"), "a+")
        except OSError as e:
            raise SystemExit(f"--out {self.out}: cannot be made or written ({e.strerror or e})") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            pid = self.lock.read().strip() or "?"
            self.lock.close()
            self.lock = None
            raise SystemExit(f"--out {self.out} is in use by another run (process {pid}): wait for it to end, or "
                             f"give another --out") from None
        self.lock.seek(0), self.lock.truncate(), self.lock.write(str(os.getpid())), self.lock.flush()
        self.check()  # again, now that no other run can write: one may have ended since the first look
        if self.overwrite:  # its files, and the checkpoints it kept along the way (pretrain.py --keep-checkpoints)
            for f in [*RUN_FILES, *glob.glob("ckpt-*.pt", root_dir=self.out)]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out, f))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.close()  # lets go of the lock
            self.lock = None
        return False


def check_resume(saved, args, may_change, path):
    """--resume goes on with the same run: every setting but those in `may_change` as `saved` (the
    checkpoint's args) has it, or one line naming each that changed."""
    changed = [f"--{k.replace('_', '-')} {v!r} (now {getattr(args, k, None)!r})" for k, v in saved.items()
               if k not in may_change and getattr(args, k, None) != v]
    if changed:
        raise SystemExit(f"{path}: saved by a run with other settings: {', '.join(changed)}; resume with the same "
                         f"command, or give another --out")


class Interrupt:
    """Ctrl-C (SIGINT), or SIGTERM (how SLURM, Kubernetes and `timeout` stop a job), taken at a step's
    end: the first sets .asked; the loop asks agreed() after each step, saves a checkpoint when it says
    so, then calls stop. A second Ctrl-C stops at once. Under torchrun the processes vote at each
    step, so all of them stop after the same one, whichever was signalled."""

    SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}  # exit codes: 128 + signal

    def __init__(self):
        self.asked, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.ask) for s in self.SIGNALS}
        return self

    def ask(self, signum, frame=None):
        if self.asked == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = self.asked or signum

    def agreed(self):
        """Whether to stop after this step: a signal came to any process (each must ask at each step)."""
        return common.any_process(self.asked is not None)

    def stop(self, line, world):
        """The run's last word: one line (rank 0's), and the exit code of the signal (130 for SIGINT,
        143 for SIGTERM), once every process has reached its end."""
        word, code = self.SIGNALS[self.asked or signal.SIGTERM]  # another process's signal: SIGTERM's
        common.print0(f"{word}: {line}", file=sys.stderr, flush=True)
        common.end_processes(world)
        raise SystemExit(code)

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        return False


# -----------------------------------------------------------------------------
# settings in range: argparse types, so that a bad value is one line naming the flag and the value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with a bad command line said in one line (argparse prints its usage first)."""

    def error(self, message):
        message = re.sub(r"^argument (\S+): (.* is not .*)$", r"\1 \2", message)  # checked: "--lr -1 is not ..."
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def checked(kind, test, what):
    """An argparse type: the text as `kind` (int or float, finite), refused unless test(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"{text or repr(text)} is not {what}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "a whole number above 0")
COUNT = checked(int, lambda v: v >= 0, "a whole number, 0 or more")
POSITIVE = checked(float, lambda v: v > 0, "a number above 0")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "a number, 0 or more")
SHARE = checked(float, lambda v: 0 <= v < 1, "a share in [0, 1)")
FRACTION = checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
