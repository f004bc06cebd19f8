"""
Pre-train U-VisualBERT (and every variant of the paper) with mask-and-predict.

    python pretrain.py --unaligned          # U: images alone, captions alone, general text (toy world)
    python pretrain.py --text-only          # the toy world's "BERT": text MLM alone
    python pretrain.py --aligned --no-tags  # S_NT, and so on (docs/METHOD.md §3)

With no data flags it uses the built-in toy world (made on first use, under toy_world/). With
--images/--captions/--text/--pairs it trains on real data. See docs/METHOD.md §2-5 for the method.
Under torchrun the same command trains data-parallel (DDP), each process building only its rows
of the global batch (--batch-size); --grad-accum N takes each process's rows in N micro-batches.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import toy
from model import PRESETS, Config, VisualBERT, peak_flops, train_flops

# -----------------------------------------------------------------------------
# settings: every flag, in one place; `python pretrain.py -h` is the manual

parser = argparse.ArgumentParser(description="Pre-train U-VisualBERT and its variants (docs/METHOD.md §3).")
group = parser.add_argument_group("variant (docs/METHOD.md §3); exactly one of the first four")
group.add_argument("--unaligned", action="store_true",
                   help="U: images alone + captions alone (unaligned) + general text")
group.add_argument("--aligned", action="store_true",
                   help="S: aligned image-caption pairs with the match loss + general text")
group.add_argument("--hybrid", action="store_true", help="H: aligned pairs + extra images alone + general text")
group.add_argument("--text-only", action="store_true",
                   help="text MLM alone (the toy world's BERT, the Base row's start)")
group.add_argument("--no-tags", action="store_true", help="regions only, no detector tags (the _NT rows)")
group.add_argument("--no-captions", action="store_true", help="with --unaligned: no captions at all (U_NC)")
group.add_argument("--nsp", action="store_true", help="add next-sentence prediction on general text")
group = parser.add_argument_group("data (default: the toy world)")
group.add_argument("--images", nargs="+", metavar="STORE",
                   help="feature stores of images (made by extract_features.py)")
group.add_argument("--captions", nargs="+", metavar="FILE", help="caption files, one caption per line")
group.add_argument("--text", nargs="+", metavar="FILE",
                   help="general text: a sentence per line, blank line between documents")
group.add_argument("--pairs", nargs="+", metavar="FILE",
                   help="aligned pairs, JSON lines {image_id, caption}, images in --images")
group.add_argument("--text-rate", type=float, default=1.0,
                   help="share of the general text used per epoch (authors: 0.5 for BookCorpus)")
group.add_argument("--heldout-images", nargs="+", metavar="STORE", help="held-out images for the before/after losses")
group.add_argument("--heldout-captions", nargs="+", metavar="FILE", help="held-out captions")
group.add_argument("--heldout-text", nargs="+", metavar="FILE", help="held-out general text")
group.add_argument("--heldout-pairs", nargs="+", metavar="FILE",
                   help="held-out aligned pairs (images in --heldout-images), for the match loss and accuracy of "
                        "--aligned and --hybrid")
group.add_argument("--toy-root", default=toy.TOY_DIR, help="where the toy world is made and cached")
group.add_argument("--cache-dir", default="cache", help="where tokenised corpora are cached")
group = parser.add_argument_group("model and optimisation (docs/METHOD.md §5)")
group.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="size preset, unless --init-from sets it")
group.add_argument("--init-from", metavar="PATH",
                   help="a Hugging Face BERT directory or one of our checkpoints (ckpt.pt)")
group.add_argument("--max-steps", type=int, default=1200)
group.add_argument("--batch-size", type=int, default=64, help="the global batch: with N processes each takes 1/N of it")
group.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="each process takes its share of the batch in N micro-batches, adding up their gradients "
                        "(less memory)")
group.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper, BERT-base: 6e-5)")
group.add_argument("--warmup", type=float, default=0.02, help="share of steps for linear warm-up (authors: 2%%)")
group.add_argument("--weight-decay", type=float, default=0.01)
group.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
group.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
group = parser.add_argument_group("run")
group.add_argument("--out", default="out/pretrain", help="output folder: log.jsonl, ckpt.pt, args.json, eval.json")
group.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
group.add_argument("--seed", type=int, default=0)
group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if there is one)")
group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)")
group.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
group.add_argument("--workers", type=int, default=None,
                   help="processes building batches (default: on a GPU, this process's share of the cores less one, at "
                        "most 8; 0 on a CPU)")
group.add_argument("--log-every", type=int, default=50)
group.add_argument("--save-every", type=int, default=1000)
group.add_argument("--eval-batches", type=int, default=4, help="batches per held-out set")
group.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate the held-out sets every this many steps (log.jsonl lines with phase \"eval\"): "
                        "how far the objectives have converged")
# every flag that names a path, and what it must be (data.check_path)
PATH_FLAGS = {"images": "folder", "captions": "file", "text": "file", "pairs": "file", "heldout_images": "folder",
              "heldout_captions": "file", "heldout_text": "file", "heldout_pairs": "file", "init_from": "checkpoint",
              "out": "out", "cache_dir": "out", "toy_root": "out"}


# -----------------------------------------------------------------------------
# data


def build_corpora(args, vocab, images):
    """The pre-training data sets of the chosen variant (docs/METHOD.md §3)."""
    tags = not args.no_tags
    corpora = [data.Corpus(f"text:{os.path.basename(c.path)}", "text", vocab, c, nsp=args.nsp, rate=args.text_rate)
               for c in tokenised(args, vocab, args.text, "docs")]
    if args.unaligned:
        corpora += [data.Corpus("images", "image", vocab, sorted(images.where), images, tags)]
        if not args.no_captions:
            corpora += [data.Corpus(f"captions:{os.path.basename(c.path)}", "caption", vocab, c)
                        for c in tokenised(args, vocab, args.captions, "lines")]
    if args.aligned or args.hybrid:
        paired = set()
        for c in tokenised(args, vocab, args.pairs, "pairs"):
            name = f"pairs:{os.path.basename(c.path)}"
            corpora.append(pairs_corpus(name, c, vocab, images, tags, "no feature store in --images holds"))
            paired.update(c.image_ids)
        if args.hybrid:  # the extra images: every stored image that is in no pair
            alone = sorted(i for i in images.where if i not in paired)
            if not alone:
                raise SystemExit("--hybrid: every image in --images is in a pair; give a store of extra images too")
            corpora.append(data.Corpus("images", "image", vocab, alone, images, tags))
    if not corpora:
        raise SystemExit("no pre-training data: give --text, and --images/--captions/--pairs as the variant needs")
    return corpora


def tokenised(args, vocab, files, kind):
    """A TokenCorpus of each file (built once, cached under --cache-dir); too many bad lines stop the run."""
    corpora = [data.TokenCorpus(f, vocab, kind, args.cache_dir) for f in files or []]
    for c in corpora:
        c.check_bad_share()
    return corpora


def pairs_corpus(name, c, vocab, images, tags, held_in):
    """The aligned pairs of TokenCorpus `c` whose image is in `images` (`held_in` says where); the others
    are skipped and counted, unless too many (data.ImagePairs)."""
    pairs = data.ImagePairs(c, images, held_in)
    return data.Corpus(name, "pair", vocab, (pairs, pairs.image_ids), images, tags)


def warn_skipped(corpora):
    """A warning on the bad records each text corpus left out (tokenised text keeps the list)."""
    texts = [c.items[0] if c.kind == "pair" else c.items for c in corpora if c.kind != "image"]
    for line in filter(None, (t.report() for t in texts)):
        say("warning: " + line)


def heldout_batches(args, vocab, class_names, n):
    """Fixed masked batches of the held-out sets, the same before and after training."""
    tags = not args.no_tags
    sets = [(f"text:{c.path}", data.Corpus("text", "text", vocab, c))
            for c in tokenised(args, vocab, args.heldout_text, "docs")]
    if not args.text_only:
        sets += [(f"captions:{c.path}", data.Corpus("captions", "caption", vocab, c))
                 for c in tokenised(args, vocab, args.heldout_captions, "lines")]
        if args.heldout_images:
            images = data.Images(args.heldout_images)
            if images.class_names != class_names:
                raise SystemExit("--heldout-images: other detector classes than the training images")
            sets.append(("images", data.Corpus("images", "image", vocab, sorted(images.where), images, tags)))
            if args.aligned or args.hybrid:  # the match objective on pairs never trained on
                for c in tokenised(args, vocab, args.heldout_pairs, "pairs"):
                    sets.append((f"pairs:{c.path}",
                                 pairs_corpus("pairs", c, vocab, images, tags, "--heldout-images does not hold")))
    out = {}
    for name, c in sets:
        out[name] = [c.batch(np.arange(i, min(i + 64, len(c))), data.RowRandom(1234, i, range(min(64, len(c) - i))))
                     for i in range(0, min(len(c), 64 * n), 64)]
    return out


@torch.no_grad()
def evaluate(model, sets, device, ctx):
    """Mean held-out loss of each objective over all held-out batches, and on pairs the share of
    them whose match or mismatch the model gets right (match_acc; chance 0.5)."""
    model.eval()
    sums, counts = {}, {}
    for batches in sets.values():
        for b in batches:
            b = to_device(b, device)
            with ctx:
                _, terms = model.pretrain_losses(b)
                if "match_labels" in b:
                    right = model.nsp(model.pool(model.encode(b)[0])).argmax(-1) == b["match_labels"]
                    terms["match_acc"] = right.float().mean()
            for k, val in terms.items():
                sums[k] = sums.get(k, 0.0) + val.item()
                counts[k] = counts.get(k, 0) + 1
    model.train()
    return {k: sums[k] / counts[k] for k in sums}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def with_positions(batch):
    """The batch and the (row, column) positions of what the model predicts, found here on the host:
    found on a GPU they would make the host wait for it (model.positions)."""
    out = dict(batch)
    if "mlm_labels" in batch:
        out["mlm_at"] = (batch["mlm_labels"] != -100).nonzero()
    if "tag_labels" in batch:
        out["tag_at"] = (batch["tag_labels"] != -100).nonzero()
    if "region_masked" in batch:
        out["region_at"] = (batch["region_masked"] & batch["region_mask"]).nonzero()
    return out


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, model, optimizer, scaler, step, args, vocab, class_names, **extra):
    """Everything to resume, written atomically; `extra` adds entries (finetune.py: its head, its generator)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": model.cfg.to_dict(), "vocab": vocab.tokens, "class_names": class_names,
            "args": vars(args), "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, **extra}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint whole


def restore(ckpt, optimizer, scaler):
    """--resume: the optimiser, the scaler and the global random states as the checkpoint left them;
    returns its step."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # saved by an fp16 run (a disabled scaler saves nothing)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    return ckpt["step"]


def trim_log(file, step, keep_phases=()):
    """--resume: the steps logged after the checkpoint's are done again; drop their lines (and any
    line without a step, such as an evaluation's, unless its phase is in `keep_phases`)."""
    if not os.path.exists(file):
        return
    with open(file) as f:
        records = [(line, json.loads(line)) for line in f if line.strip()]
    with open(file, "w") as f:
        f.writelines(line for line, r in records if r.get("step", step + 1) <= step or r.get("phase") in keep_phases)


def read_log(file):
    """log.jsonl's records ([] when there is none yet)."""
    if not os.path.exists(file):
        return []
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SystemExit(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


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
            return VisualBERT.from_bert(src, **visual, **drop), data.Vocab.from_file(os.path.join(src, "vocab.txt"))
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
        return model, data.Vocab(ckpt["vocab"], source=src)
    vocab = data.Vocab.from_file(vocab_file)
    return VisualBERT(Config(**{**PRESETS[args.model], "vocab_size": len(vocab), **visual, **drop})), vocab


def load_weights(module, state, src):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # the first line names the mismatch; the rest lists every tensor
        raise SystemExit(f"{src}: its weights do not fit the model ({str(e).splitlines()[0].strip()} ...)") from None


def autocast(device, dtype):
    """The autocast context for "fp32" (none), "bf16" or "fp16"."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=half) if half else torch.autocast(device.type, enabled=False)


def pick_dtype(args, device):
    if args.dtype != "auto":
        return args.dtype, "as asked"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", "the GPU supports bf16"
    return "fp32", "no GPU with bf16 here"


# -----------------------------------------------------------------------------
# what pretrain.py and finetune.py share: processes, the optimiser, the step

RANK = int(os.environ.get("RANK", 0))  # torchrun starts every process with its rank; rank 0 alone speaks and writes


def say(*a, **k):
    """print, on rank 0 alone."""
    if RANK == 0:
        print(*a, **k)


def setup_device(args):
    """(device, rank, world size). Under torchrun each process takes one GPU (or CPU with gloo)."""
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        return device, rank, world
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if args.device == "auto" else args.device), 0, 1


def check_batch(batch_size, world, grad_accum):
    """--batch-size is the global batch: each of the `world` processes takes an equal share of it,
    in --grad-accum equal micro-batches."""
    if grad_accum < 1 or batch_size % (world * grad_accum):
        raise SystemExit(f"--batch-size {batch_size} is the global batch: it must split into {world} process(es) "
                         f"x --grad-accum {grad_accum} equal micro-batches")


def leave(world):
    """The end of a run under torchrun: rank 0 evaluates and writes alone at the end, so the others wait
    for it before the process group goes (one that left early aborted the other's gloo threads)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def toy_world(root, world):
    """The toy world under `root`: rank 0 makes it on first use, the other processes wait for it."""
    root = toy.make_toy_world(root) if RANK == 0 else root
    if world > 1:
        dist.barrier()
    return root


def write_args(args, world):
    """OUT/args.json: the command, every setting, the versions."""
    if RANK == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({"argv": sys.argv, "args": vars(args), "world_size": world, "torch": torch.__version__,
                       "python": platform.python_version()}, f, indent=1)


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


def wrap(module, device, world, compile=False):
    """What the training steps call: `module` compiled and/or wrapped in DDP (checkpoints keep the plain model)."""
    run = torch.compile(module) if compile else module
    if world > 1:  # a batch may leave modules unused (text: the visual ones), so DDP must look for them
        run = DDP(run, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return run


def shard(rows, i, n):
    """Part i of n of `rows`, consecutive rows: a list, or a batch (every tensor's first axis is the rows)."""
    if isinstance(rows, dict):
        B = next(iter(rows.values())).shape[0]
        return {k: v[B * i // n:B * (i + 1) // n] for k, v in rows.items()}
    return rows[len(rows) * i // n:len(rows) * (i + 1) // n]


def all_sum(t):
    """`t` summed over the processes, in place (itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def optimizer_step(run, micro, loss_of, optimizer, scaler, lr, clip, ctx):
    """One optimiser step on this process's micro-batches: their gradients add up (under DDP they are
    averaged over the processes at the last backward alone), then clip and step. loss_of(micro-batch)
    is its share of the global batch's loss (the shares of all micro-batches of all processes sum to
    it). Returns the gradient norm, a device tensor: nothing here makes the host wait for the device."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    for j, mb in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last or not isinstance(run, DDP) else run.no_sync():
            with ctx:
                loss = loss_of(mb)
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # fp16: the true gradients, for the clip
    norm = torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], clip)
    scaler.step(optimizer)  # fp16: a step whose gradients are not finite is skipped, and the scale lowered
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# -----------------------------------------------------------------------------
# the run


class Objectives(torch.nn.Module):
    """What DDP and torch.compile wrap: forward(batch) -> the pre-training terms (sum, count)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.pretrain_terms(batch)


def pretrain_step(model, run, micro, world, optimizer, scaler, lr, clip, ctx):
    """One step of mask-and-predict on this process's micro-batches (on the device). Each objective's
    sum is divided by its count over the global batch, which the batch alone gives before any forward:
    N micro-batches on P processes take the step one process takes on the whole batch. Returns the
    objectives' names, this process's sums, the global counts and the gradient norm, device tensors."""
    names = list(model.term_counts(micro[0]))
    counts = all_sum(sum(torch.stack(list(model.term_counts(mb).values())) for mb in micro)).clamp(min=1)
    sums = []

    def loss_of(mb):
        s = torch.stack([s_.float() for s_, _ in run(mb).values()])
        sums.append(s.detach())
        return (s / counts).sum() * world  # DDP averages the processes' gradients; the loss is their sum

    norm = optimizer_step(run, micro, loss_of, optimizer, scaler, lr, clip, ctx)
    return names, sum(sums), counts, norm


def read_terms(pending, scaler, ckpt_path):
    """The objectives' global values at the last of the steps since the host last looked (logging and
    saving steps), after checking each of those steps' loss: one read of the device for all of them.
    A non-finite loss stops the run (under fp16 the scaler skipped that step instead)."""
    totals = torch.stack([(s / c).sum() for _, _, s, c in pending])  # this process's share of each step's loss
    step, names, sums, counts = pending[-1]
    both = all_sum(torch.cat([totals, sums]))
    both = torch.cat([both[:len(pending)], both[len(pending):] / counts]).tolist()
    bad = [entry for entry, t in zip(pending, both) if not math.isfinite(t)]
    if bad and not scaler.is_enabled():
        step, names, sums, counts = bad[0]
        terms = ", ".join(f"{k} {value:.4g}" for k, value in zip(names, (all_sum(sums.clone()) / counts).tolist()))
        raise SystemExit(f"step {step}: non-finite loss ({terms}); stopping, the last good checkpoint is {ckpt_path}")
    return dict(zip(names, both[len(pending):]))


def status(r, max_steps, dt, steps, samples, tokens, mfu):
    """A logging step's line: record r's losses, then the speed over the `steps` steps of `dt` seconds
    since the last line, of all processes together."""
    shown = ("step", "loss", "lr", "modality", "grad_norm")  # in the line's own fields
    terms = " ".join(f"{k} {value:.3f}" for k, value in r.items() if k not in shown)
    return (f"step {r['step']}/{max_steps} | {r['modality']:<20} | loss {r['loss']:.3f} ({terms}) | lr {r['lr']:.2e} | "
            f"norm {r['grad_norm']:.2f} | {dt / steps * 1000:.0f} ms/step | {samples / dt:.0f} samples/s | "
            f"{tokens / dt:.0f} tokens/s | MFU {mfu} | ETA {dt / steps * (max_steps - r['step']) / 60:.1f} min")


def train(args, model, run, dataset, optimizer, scaler, lr_at, step, device, dtype, ctx, world, save, heldout, curve):
    """Steps `step` + 1 to --max-steps; rank 0 logs, prints and saves (save(step)), and every --eval-every
    steps appends the held-out losses to `curve`. The host reads the device on logging and saving steps
    alone: the check for a non-finite loss waits for them."""
    master = RANK == 0
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # the processes of a machine share it
    workers = args.workers if args.workers is not None else (max(1, min(8, cores - 1)) if device.type == "cuda" else 0)
    loader = data.batches(dataset, range(step, args.max_steps), workers, pin_memory=device.type == "cuda")
    say(f"batches built by {workers} worker process(es)" if workers else "batches built in this process (--workers 0)")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    model.train()
    t0, window, pending = time.time(), [0, 0, 0, 0.0], []  # steps, samples, tokens, FLOPs of this process since a line
    for name, batch in loader:
        lr = lr_at(step)
        micro = [to_device(with_positions(shard(batch, j, args.grad_accum)), device) for j in range(args.grad_accum)]
        names, sums, counts, norm = pretrain_step(model, run, micro, world, optimizer, scaler, lr, args.clip, ctx)
        step += 1
        B = next(iter(batch.values())).shape[0]  # this process's rows; the batch is on the host
        T = sum(batch[k].shape[1] for k in ("input_ids", "tag_ids", "feats") if k in batch)
        predicted = sum(int((batch[k] != -100).sum()) for k in ("mlm_labels", "tag_labels") if k in batch)
        window = [window[0] + 1, window[1] + B, window[2] + B * T, window[3] + train_flops(model.cfg, B, T, predicted)]
        pending.append((step, names, sums, counts))
        log_now = step % args.log_every == 0 or step == args.max_steps
        save_now = step % args.save_every == 0 or step == args.max_steps
        if not (log_now or save_now):
            continue
        terms, pending = read_terms(pending, scaler, os.path.join(args.out, "ckpt.pt")), []
        if log_now:
            dt = time.time() - t0
            samples, tokens, flops = all_sum(torch.tensor(window[1:], dtype=torch.float64, device=device)).tolist()
            peak = peak_flops(device, dtype)
            mfu = f"{flops / dt / (peak * world):.1%}" if peak else "n/a"
            record = {"step": step, "loss": sum(terms.values()), "lr": lr, "modality": name, "grad_norm": norm.item(),
                      **terms}
            say(status(record, args.max_steps, dt, window[0], samples, tokens, mfu), flush=True)
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
            t0, window = time.time(), [0, 0, 0, 0.0]
        if save_now and master:
            save(step)
        if master and heldout and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            curve.append({"step": step, **evaluate(model, heldout, device, ctx)})
            log.write(json.dumps({"phase": "eval", **curve[-1]}) + "\n")
            log.flush()
            say(f"held-out at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in curve[-1].items() if k != "step"))
    if log:
        log.close()
    return step


def use_toy_world(args, world):
    """With no data flags, the toy world's files (made on first use); returns its vocabulary file
    (None with real data)."""
    if args.images or args.captions or args.text or args.pairs:
        return None
    root = toy_world(args.toy_root, world)
    args.text = [os.path.join(root, "pretrain", "text.txt")]
    args.captions = [os.path.join(root, "pretrain", "captions.txt")]
    args.pairs = [os.path.join(root, "pretrain", "pairs.jsonl")]
    args.images = [os.path.join(root, "features", s) for s in ("pretrain", "extra")[:2 if args.hybrid else 1]]
    args.heldout_text = args.heldout_text or [os.path.join(root, "heldout", "text.txt")]
    args.heldout_captions = args.heldout_captions or [os.path.join(root, "heldout", "captions.txt")]
    args.heldout_images = args.heldout_images or [os.path.join(root, "features", "heldout")]
    args.heldout_pairs = args.heldout_pairs or [os.path.join(root, "heldout", "pairs.jsonl")]
    return os.path.join(root, "vocab.txt")


def parse_args(argv):
    """The settings, checked before any work."""
    args = parser.parse_args(argv)
    if sum([args.unaligned, args.aligned, args.hybrid, args.text_only]) != 1:
        parser.error("choose exactly one of --unaligned, --aligned, --hybrid, --text-only")
    if args.no_captions and not args.unaligned:
        parser.error("--no-captions goes with --unaligned (the U_NC row)")
    data.check_paths(args, PATH_FLAGS)
    return args


def open_images(paths):
    """The image stores of --images (None without): with --text-only they size the visual modules."""
    try:
        return data.Images(paths) if paths else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def load_corpora(args, vocab, images, class_names, rank, world):
    """The training corpora, and on rank 0 the held-out batches."""
    try:
        corpora = build_corpora(args, vocab, images)
        heldout = heldout_batches(args, vocab, class_names, args.eval_batches) if rank == 0 else {}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    for c in corpora:  # a data set smaller than a batch makes batches of its size, which still split
        if len(c) < world * args.grad_accum:
            raise SystemExit(f"{c.name}: {len(c)} items, fewer than the {world} process(es) x --grad-accum "
                             f"{args.grad_accum} micro-batches of a step")
    return corpora, heldout


def describe(args, model, device, world, dtype, why, corpora, dataset):
    """The start-up lines: model, device and dtype, data, steps."""
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg.layers} layers, hidden {model.cfg.hidden}")
    say(f"device: {device} x {world} process(es), dtype: {dtype} ({why}), compile: {args.compile}")
    for c in corpora:
        say(f"data: {c.name} ({c.kind}), {len(c)} items")
    micro = f" in {args.grad_accum} micro-batches of {args.batch_size // (world * args.grad_accum)} per process"
    say(f"{dataset.steps_per_epoch} steps per epoch, {args.max_steps} steps, global batch {args.batch_size}"
        + (micro if args.grad_accum > 1 else ""))
    warn_skipped(corpora)


def write_eval(args, before, after, step, curve):
    """The held-out losses before -> after, said and written to OUT/eval.json with the curve."""
    if before:
        say("held-out loss   before  ->  after")
        for k in after:
            say(f"  {k:<8} {before.get(k, float('nan')):9.3f} -> {after[k]:7.3f}")
    else:
        say("held-out after: " + ", ".join(f"{k} {value:.3f}" for k, value in after.items()))
    curve.append({"step": step, **after})
    result = {"before": before, "after": after, "step": step, "curve": curve}
    # whole or not at all: reproduce.py takes eval.json to mean the run is done
    data.write_atomic(os.path.join(args.out, "eval.json"), lambda f: json.dump(result, f, indent=1), "w")


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_device(args)
    check_batch(args.batch_size, world, args.grad_accum)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dtype, why = pick_dtype(args, device)
    ctx = autocast(device, dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
    torch.backends.cudnn.allow_tf32 = True

    vocab_file = use_toy_world(args, world)  # the toy world unless real data is given
    images = open_images(args.images)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = load_checkpoint(ckpt_path) if args.resume else None
    if resume is not None:
        args.init_from = ckpt_path
    model, vocab = make_model(args, images, vocab_file, ckpt=resume)  # real data without a vocabulary stops here
    model.to(device)
    class_names = images.class_names if images is not None else None
    corpora, heldout = load_corpora(args, vocab, images, class_names, rank, world)
    dataset = data.PretrainData(corpora, args.batch_size, args.seed, rank, world)
    os.makedirs(args.out, exist_ok=True)  # only now: a bad input leaves no output folder behind

    optimizer, lr_at, scaler = make_optimizer(model.parameters(), args, args.max_steps, device, dtype)
    step = 0
    log_file = os.path.join(args.out, "log.jsonl")
    if resume is not None:
        step = restore(resume, optimizer, scaler)
        if rank == 0:
            trim_log(log_file, step)
        say(f"resuming from {ckpt_path} at step {step}")
    run = wrap(Objectives(model), device, world, args.compile)
    write_args(args, world)
    describe(args, model, device, world, dtype, why, corpora, dataset)

    before = evaluate(model, heldout, device, ctx) if heldout and step == 0 else None
    if before:
        say("held-out before: " + ", ".join(f"{k} {value:.3f}" for k, value in before.items()))
    save = lambda s: save_checkpoint(ckpt_path, model, optimizer, scaler, s, args, vocab, class_names)  # noqa: E731
    curve = [r for r in read_log(log_file) if r.get("phase") == "eval"] if rank == 0 and step else []
    step = train(args, model, run, dataset, optimizer, scaler, lr_at, step, device, dtype, ctx, world, save, heldout,
                 curve)
    after = evaluate(model, heldout, device, ctx) if heldout else None
    if after:
        write_eval(args, before, after, step, curve)
    warn_skipped(corpora)  # said again at the end, where it is seen
    say(f"checkpoint: {ckpt_path}")
    leave(world)
    return after


if __name__ == "__main__":
    main()
