"""
What the training scripts share: processes and devices, dtype, the model made from --init-from, the
optimiser, and the step: train_step takes one optimiser step on a process's micro-batches and
read_losses reads the losses back, for pretrain.py's loop, finetune.py's, NLVR2's task pre-training
and bench.py alike. Importing it defines things and does nothing else.
"""

import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import storage
from data import Vocab, with_positions
from model import PRESETS, Config, VisualBERT

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
        global VOTES  # any_process's: a vote over CPU tensors waits for no GPU
        VOTES = dist.new_group(backend="gloo") if cuda else None
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


VOTES = None  # the process group of any_process's votes (None: the default one)


def any_process(flag):
    """Whether `flag` holds in any process (itself with one process); every process must ask."""
    if not dist.is_initialized():
        return flag
    vote = torch.tensor([int(flag)])
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=VOTES)
    return bool(vote.item())


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
    targets = [model.count_targets(mb) for mb in micro]
    return list(targets[0]), all_sum(sum(torch.stack(list(t.values())) for t in targets)).clamp(min=1)


def pretrain_share(counts):
    """train_step's share for the pre-training loss: a micro-batch's objective sums (pretrain_loss's first
    output) over `counts`, the global batch's (global_counts), and the sums, to log."""
    return lambda out, mb: ((out[0] / counts).sum(), out[0])


def micro_batches(batch, n, device):
    """A pre-training batch on the host -> its n micro-batches on the device, each with the positions
    of what the model predicts found on the host (data.with_positions)."""
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
    """One optimiser step on this process's micro-batches: their forward and backward passes (under DDP
    the gradients are averaged at the last backward alone), then clip and step. share(loss(mb), mb) ->
    (mb's share of the global batch's loss, what to log of it). Returns the gradient norm and the logged
    parts added up, device tensors: nothing here makes the host wait for the device."""
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
    """The global losses of the steps since the host last looked, in one read of the device. pending:
    (step, objective names or None, this process's sums, what they are divided by) of each step.
    Returns each step's {name: loss}, or loss; a non-finite one stops the run naming `saved`, the last
    checkpoint (under fp16 the scaler skipped that step instead)."""
    sums = all_sum(torch.cat([s.reshape(-1) for _, _, s, _ in pending]))
    values = (sums / torch.cat([c.reshape(-1) for _, _, _, c in pending])).tolist()  # the one read
    losses, at = [], 0
    for step, names, s, _ in pending:
        value, at = values[at:at + s.numel()], at + s.numel()
        losses.append(dict(zip(names, value)) if names else value[0])
        if all(map(math.isfinite, value)) or scaler.is_enabled():
            continue
        what = f"({', '.join(f'{k} {v:.4g}' for k, v in zip(names, value))})" if names else f"{value[0]}"
        raise SystemExit(f"step {step}: non-finite loss {what}; stopping, {last_good(saved)}; try a lower --lr")
    return losses


def last_good(saved):
    """What a run that stops says of its checkpoint: `saved`, the last one written ((path, step), or None)."""
    return f"the last good checkpoint is {saved[0]} (step {saved[1]})" if saved else "no checkpoint was saved yet"


# -----------------------------------------------------------------------------
# the model, new or from a checkpoint


def make_model(args, images, vocab_file, src=None, ckpt=None, check=None):
    """A model and its vocabulary, from `src` (default: --init-from): a Hugging Face BERT directory
    (its weights and vocabulary, new visual modules sized from `images`) or a checkpoint of
    pretrain.py or finetune.py (its config, weights and vocabulary; `ckpt` if loaded already), which
    check(cfg, ckpt) stops when it does not fit the data (default: every visual size must match);
    without either, random weights of --model and the vocabulary in `vocab_file` (the toy world's)."""
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
        ckpt = storage.load_checkpoint(src) if ckpt is None else ckpt
        if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= set(ckpt):
            raise SystemExit(f"{src}: not a checkpoint of pretrain.py or finetune.py (no model, config and vocab "
                             f"inside); --init-from takes one of those or a Hugging Face BERT directory")
        cfg = Config(**{**ckpt["config"], **drop})
        (check or same_sizes)(cfg, ckpt)
        model = VisualBERT(cfg)
        storage.load_weights(model, ckpt["model"], src)
        return model, Vocab(ckpt["vocab"], source=src)
    vocab = Vocab.from_file(vocab_file)
    return VisualBERT(Config(**{**PRESETS[args.model], "vocab_size": len(vocab), **visual, **drop})), vocab
