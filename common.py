"""
What every script shares, in one place: processes and devices, dtype, the optimiser and its step,
checkpoints, the output folder and its files, and the checks on paths and settings.

pretrain.py and finetune.py keep their own loops and import this; so do extract_features.py, ask.py,
reproduce.py and bench.py. Importing it defines things and does nothing else.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model import PRESETS, Config, VisualBERT, with_positions

# -----------------------------------------------------------------------------
# processes and devices: one process, or one per GPU (or CPU, with gloo) under torchrun


def rank():
    """This process's rank under torchrun (0 alone: the one that prints and writes)."""
    return int(os.environ.get("RANK", 0))


def print0(*a, **k):
    """print, on rank 0 alone."""
    if rank() == 0:
        print(*a, **k)


def init_device(flag):
    """(device, rank, world size) for --device `flag`: under torchrun each process takes one GPU, or
    the CPU with gloo."""
    if "RANK" in os.environ:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and flag in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        return device, rank(), world
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if flag == "auto" else flag), 0, 1


def end_processes(world):
    """The end of a run under torchrun: rank 0 evaluates and writes alone at the end, so the others wait
    for it before the process group goes (one that left early aborted the other's gloo threads)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(make, world):
    """make() on rank 0 while the other processes wait (the toy world, made on first use)."""
    out = make() if rank() == 0 else None
    if world > 1:
        dist.barrier()
    return out


def all_sum(t):
    """`t` summed over the processes, in place (itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def shard(rows, i, n):
    """Part i of n of `rows`, consecutive rows: a list, or a batch (every tensor's first axis is the rows)."""
    if isinstance(rows, dict):
        B = next(iter(rows.values())).shape[0]
        return {k: v[B * i // n:B * (i + 1) // n] for k, v in rows.items()}
    return rows[len(rows) * i // n:len(rows) * (i + 1) // n]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def global_counts(model, micro):
    """What each objective's sum is divided by: its count over the global batch, this process's
    micro-batches added up, then the processes'. The labels alone give it, before any forward
    (model.count_targets). Returns the objectives' names and their counts (a device tensor)."""
    counts = sum(model.count_targets(mb) for mb in micro)
    return model.objectives(micro[0]), all_sum(counts).clamp(min=1)


def micro_batches(batch, n, device):
    """A pre-training batch on the host -> its n micro-batches on the device, each with the positions
    of what the model predicts found on the host (model.with_positions)."""
    return [to_device(with_positions(shard(batch, j, n)), device) for j in range(n)]


def check_batch(batch_size, world, grad_accum):
    """--batch-size is the global batch: each of the `world` processes takes an equal share of it,
    in --grad-accum equal micro-batches."""
    if batch_size % (world * grad_accum):
        raise SystemExit(f"--batch-size {batch_size} is the global batch: it must split into {world} process(es) "
                         f"x --grad-accum {grad_accum} equal micro-batches")


class Loss(nn.Module):
    """What a training step calls, and DDP wraps: forward(batch) is loss(batch), the pre-training loss
    or a task's; its parameters are the model's and the task head's."""

    def __init__(self, loss, model, head=None):
        super().__init__()
        self.loss, self.model, self.head = loss, model, head

    def forward(self, batch):
        return self.loss(batch)


def wrap(loss, device, world, compile=False):
    """A Loss as the training steps call it: with --compile the model's forward compiled (in place: the
    checkpoints keep the plain model's weights), under torchrun wrapped in DDP."""
    if compile:
        loss.model.compile()
    if world > 1:  # a batch may leave modules unused (text: the visual ones), so DDP must look for them
        loss = DDP(loss, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return loss


def pick_dtype(flag, device):
    """The autocast dtype of --dtype `flag`, and why."""
    if flag != "auto":
        return flag, "as asked"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", "the GPU supports bf16"
    return "fp32", "no GPU with bf16 here"


def autocast(device, dtype):
    """The autocast context for "fp32" (none), "bf16" or "fp16"."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=half) if half else torch.autocast(device.type, enabled=False)


# -----------------------------------------------------------------------------
# the optimiser and its step


def make_optimizer(params, args, steps, device, dtype):
    """AdamW without decay on biases and LayerNorms (BERT); the learning rate of each step, a linear
    warm-up over --warmup of the steps, then linear decay to zero; the loss scaler, which fp16 alone
    needs (disabled, it passes everything through)."""
    params = list(params)
    groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, fused=True)  # fused: no host reads
    warmup = max(1, int(args.warmup * steps))
    lr_at = lambda s: args.lr * min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))  # noqa: E731
    return optimizer, lr_at, torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


def train_step(loss, micro, share, optimizer, scaler, lr, clip, ctx, world):
    """One optimiser step on this process's micro-batches: each one's forward and backward (their
    gradients add up; under DDP they are averaged over the processes at the last backward alone), then
    clip and step. share(out, mb) -> (mb's share of the global batch's loss, where out = loss(mb); the
    shares of all micro-batches of all processes sum to it, what to log of it). Returns the gradient
    norm and the logged parts added up over the micro-batches, device tensors: nothing here makes the
    host wait for the device."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    logged = 0
    for j, mb in enumerate(micro):
        if world > 1:  # DDP averages the processes' gradients at the last micro-batch's backward alone
            loss.require_backward_grad_sync = j == len(micro) - 1
        with ctx:
            value, part = share(loss(mb), mb)
            value = value * world  # DDP averages the processes' gradients; the loss is their sum
        scaler.scale(value).backward()
        logged = logged + part.detach()
    return clip_and_step(optimizer, scaler, clip), logged


def clip_and_step(optimizer, scaler, clip):
    """After the micro-batches' backward passes: clip the gradient norm, step, clear the gradients.
    Returns the norm, a device tensor: nothing here makes the host wait for the device."""
    scaler.unscale_(optimizer)  # fp16: the true gradients, for the clip
    norm = torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], clip)
    scaler.step(optimizer)  # fp16: a step whose gradients are not finite is skipped, and the scale lowered
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def read_losses(pending, scaler, saved):
    """The global losses of the steps since the host last looked (logging and saving steps), in one
    read of the device. pending: (step, names, this process's sums, what they are divided by) of each
    step: each objective's, in `names` order, or (names None) one loss divided by 1. A non-finite loss
    stops the run with one line naming the step and `saved`, the last good checkpoint ((path, step), or
    None); under fp16 the scaler skipped that step instead. Returns each step's losses: {name: value},
    or the value."""
    sums = all_sum(torch.cat([s.reshape(-1) for _, _, s, _ in pending]))
    values = sums / torch.cat([c.reshape(-1) for _, _, _, c in pending])
    losses = []
    for (step, names, _, _), value in zip(pending, values.split([s.numel() for _, _, s, _ in pending])):
        value = value.tolist()
        losses.append(dict(zip(names, value)) if names else value[0])
        if all(map(math.isfinite, value)) or scaler.is_enabled():
            continue
        what = f"({', '.join(f'{k} {v:.4g}' for k, v in zip(names, value))})" if names else f"{value[0]}"
        last = f"the last good checkpoint is {saved[0]} (step {saved[1]})" if saved else "no checkpoint was saved yet"
        raise SystemExit(f"step {step}: non-finite loss {what}; stopping, {last}; try a lower --lr")
    return losses


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, model, optimizer, scaler, step, args, vocab, class_names, **extra):
    """Everything to resume, written atomically; `extra` adds entries (finetune.py: its head, its generator)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": model.cfg.to_dict(), "vocab": vocab.tokens, "class_names": class_names,
            "args": vars(args), "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, **extra}
    write_atomic(path, lambda f: torch.save(ckpt, f))  # a kill mid-save leaves the previous checkpoint whole


def load_checkpoint(path):
    """A checkpoint, or one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SystemExit(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def load_weights(module, state, src):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # the first line names the mismatch; the rest lists every tensor
        raise SystemExit(f"{src}: its weights do not fit the model ({str(e).splitlines()[0].strip()} ...)") from None


def restore(ckpt, optimizer, scaler):
    """--resume: the optimiser, the scaler and the global random states as the checkpoint left them;
    returns its step."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # saved by an fp16 run (a disabled scaler saves nothing)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    return ckpt["step"]


def make_model(args, images, vocab_file, src=None, ckpt=None, check=None):
    """A model and its vocabulary, from `src` (default: --init-from): a Hugging Face BERT directory
    (its weights and vocabulary, new visual modules sized from `images`) or a checkpoint of
    pretrain.py or finetune.py (its config, weights and vocabulary; `ckpt` if loaded already), which
    check(cfg, ckpt) stops when it does not fit the data (default: every visual size must match);
    without either, random weights of --model and the vocabulary in `vocab_file` (the toy world's)."""
    from data import Vocab  # data imports this module

    visual = dict(feat_dim=images.feature_dim, num_labels=len(images.class_names),
                  num_attrs=len(images.attr_names or [])) if images is not None else {}
    drop = {} if args.dropout is None else {"dropout": args.dropout}
    src = src or args.init_from
    if not src and vocab_file is None:  # pretrain.py and finetune.py alike stop here, before any model is built
        raise SystemExit("real data needs a vocabulary: give --init-from (a BERT directory or a checkpoint)")

    def same_sizes(cfg, ckpt):  # pre-training trains every visual head on
        for k, val in visual.items():
            if getattr(cfg, k) != val:
                raise SystemExit(f"{src}: the checkpoint has {k}={getattr(cfg, k)}, the images have {val}")

    if src and os.path.isdir(src):
        try:
            return VisualBERT.from_bert(src, **visual, **drop), Vocab.from_file(os.path.join(src, "vocab.txt"))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if src:
        ckpt = load_checkpoint(src) if ckpt is None else ckpt
        if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= set(ckpt):
            raise SystemExit(f"{src}: not a checkpoint of pretrain.py or finetune.py (no model, config and vocab "
                             f"inside); --init-from takes one of those or a Hugging Face BERT directory")
        cfg = Config(**{**ckpt["config"], **drop})
        (check or same_sizes)(cfg, ckpt)
        model = VisualBERT(cfg)
        load_weights(model, ckpt["model"], src)
        return model, Vocab(ckpt["vocab"], source=src)
    vocab = Vocab.from_file(vocab_file)
    return VisualBERT(Config(**{**PRESETS[args.model], "vocab_size": len(vocab), **visual, **drop})), vocab


# -----------------------------------------------------------------------------
# the output folder and its files


def write_atomic(file, write, mode="wb"):
    """write(f) to a temporary file renamed to `file`: readers never see half a file. One temporary
    name per process: writers may run side by side."""
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, file)


def write_json(file, obj, indent=None):
    """`obj` as JSON, written atomically (json.dumps runs in C, json.dump does not)."""
    write_atomic(file, lambda f: f.write(json.dumps(obj, indent=indent)), "w")


def read_json(file):
    """A JSON file, with a clear error naming the file when it is missing, unreadable or malformed."""
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{file}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an empty file
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def write_args(args, world):
    """OUT/args.json: the command, every setting, the versions."""
    if rank() == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({"argv": sys.argv, "args": vars(args), "world_size": world, "torch": torch.__version__,
                       "python": platform.python_version()}, f, indent=1)


def read_log(file):
    """log.jsonl's records ([] when there is none yet)."""
    if not os.path.exists(file):
        return []
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_log(file, step, keep_phases=()):
    """--resume: the steps logged after the checkpoint's are done again; drop their lines (and any
    line without a step, such as an evaluation's, unless its phase is in `keep_phases`)."""
    if not os.path.exists(file):
        return
    with open(file) as f:
        records = [(line, json.loads(line)) for line in f if line.strip()]
    with open(file, "w") as f:
        f.writelines(line for line, r in records if r.get("step", step + 1) <= step or r.get("phase") in keep_phases)


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
        if up != os.path.abspath(path):  # the first folder to make, made and removed now: one that cannot be is said
            first = os.path.join(up, os.path.relpath(os.path.abspath(path), up).split(os.sep)[0])  # before any work
            try:
                os.mkdir(first)
                os.rmdir(first)
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
        if rank() != 0:
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
    """Ctrl-C, taken at a step's end: the first sets .asked (the loop saves a checkpoint, then calls
    stop), a second stops at once. In one process only: under torchrun the processes could see it at
    different steps, so there torchrun's own handling stays (a run resumes from its last checkpoint)."""

    def __init__(self):
        self.asked, self.previous = False, None

    def __enter__(self):
        alone = int(os.environ.get("WORLD_SIZE", 1)) == 1
        if alone and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum=None, frame=None):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def stop(self, line):
        """The run's last word after Ctrl-C: one line, and exit code 130 (killed by SIGINT)."""
        print(f"interrupted: {line}", file=sys.stderr, flush=True)
        raise SystemExit(130)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
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
