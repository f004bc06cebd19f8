"""
Pre-train U-VisualBERT (and every variant of the paper) with mask-and-predict.

    python pretrain.py --unaligned          # U: images alone, captions alone, general text (toy world)
    python pretrain.py --text-only          # the toy world's "BERT": text MLM alone
    python pretrain.py --aligned --no-tags  # S_NT, and so on (SPEC 3)

With no data flags it uses the built-in toy world (made on first use, under toy_world/). With
--images/--captions/--text/--pairs it trains on real data. See SPEC 2-5 for the method.
"""

import argparse
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
from model import PRESETS, Config, VisualBERT, config_from_hf, load_bert, peak_flops, train_flops

# -----------------------------------------------------------------------------
# settings: every flag, in one place; `python pretrain.py -h` is the manual

p = argparse.ArgumentParser(description="Pre-train U-VisualBERT and its variants (SPEC 3).")
v = p.add_argument_group("variant (SPEC 3); exactly one of the first four")
v.add_argument("--unaligned", action="store_true", help="U: images alone + captions alone (unaligned) + general text")
v.add_argument("--aligned", action="store_true", help="S: aligned image-caption pairs with the match loss + general text")
v.add_argument("--hybrid", action="store_true", help="H: aligned pairs + extra images alone + general text")
v.add_argument("--text-only", action="store_true", help="text MLM alone (the toy world's BERT, the Base row's start)")
v.add_argument("--no-tags", action="store_true", help="regions only, no detector tags (the _NT rows)")
v.add_argument("--no-captions", action="store_true", help="with --unaligned: no captions at all (U_NC)")
v.add_argument("--nsp", action="store_true", help="add next-sentence prediction on general text")
d = p.add_argument_group("data (default: the toy world)")
d.add_argument("--images", nargs="+", metavar="STORE", help="feature stores of images (made by extract_features.py)")
d.add_argument("--captions", nargs="+", metavar="FILE", help="caption files, one caption per line")
d.add_argument("--text", nargs="+", metavar="FILE", help="general text: a sentence per line, blank line between documents")
d.add_argument("--pairs", nargs="+", metavar="FILE", help="aligned pairs, JSON lines {image_id, caption}, images in --images")
d.add_argument("--text-rate", type=float, default=1.0, help="share of the general text used per epoch (authors: 0.5 for BookCorpus)")
d.add_argument("--heldout-images", nargs="+", metavar="STORE", help="held-out images for the before/after losses")
d.add_argument("--heldout-captions", nargs="+", metavar="FILE", help="held-out captions")
d.add_argument("--heldout-text", nargs="+", metavar="FILE", help="held-out general text")
d.add_argument("--heldout-pairs", nargs="+", metavar="FILE", help="held-out aligned pairs (images in --heldout-images), "
               "for the match loss and accuracy of --aligned and --hybrid")
d.add_argument("--toy-root", default=toy.TOY_DIR, help="where the toy world is made and cached")
d.add_argument("--cache-dir", default="cache", help="where tokenised corpora are cached")
m = p.add_argument_group("model and optimisation (SPEC 5)")
m.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="size preset, unless --init-from sets it")
m.add_argument("--init-from", metavar="PATH", help="a Hugging Face BERT directory or one of our checkpoints (ckpt.pt)")
m.add_argument("--max-steps", type=int, default=1200)
m.add_argument("--batch-size", type=int, default=64, help="the global batch: with N processes each takes 1/N of it")
m.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper, BERT-base: 6e-5)")
m.add_argument("--warmup", type=float, default=0.02, help="share of steps for linear warm-up (authors: 2%%)")
m.add_argument("--weight-decay", type=float, default=0.01)
m.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
m.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
r = p.add_argument_group("run")
r.add_argument("--out", default="out/pretrain", help="output folder: log.jsonl, ckpt.pt, args.json, eval.json")
r.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
r.add_argument("--seed", type=int, default=0)
r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if there is one)")
r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)")
r.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
r.add_argument("--workers", type=int, default=None, help="processes building batches (default: on a GPU, this process's share of the cores less one, at most 8; 0 on a CPU)")
r.add_argument("--log-every", type=int, default=50)
r.add_argument("--save-every", type=int, default=1000)
r.add_argument("--eval-batches", type=int, default=4, help="batches per held-out set")
r.add_argument("--eval-every", type=int, default=0, help="also evaluate the held-out sets every this many steps "
               "(log.jsonl lines with phase \"eval\"): how far the objectives have converged")


# -----------------------------------------------------------------------------
# data


def build_corpora(args, vocab, images):
    """The pre-training data sets of the chosen variant (SPEC 3)."""
    tags = not args.no_tags
    tok = lambda files, kind: [data.TokenCorpus(f, vocab, kind, args.cache_dir) for f in files or []]
    corpora = [data.Corpus(f"text:{os.path.basename(c.path)}", "text", vocab, c, nsp=args.nsp, rate=args.text_rate)
               for c in tok(args.text, "docs")]
    if args.unaligned:
        corpora += [data.Corpus("images", "image", vocab, sorted(images.where), images, tags)]
        if not args.no_captions:
            corpora += [data.Corpus(f"captions:{os.path.basename(c.path)}", "caption", vocab, c) for c in tok(args.captions, "lines")]
    if args.aligned or args.hybrid:
        paired = set()
        for c in tok(args.pairs, "pairs"):
            missing = [i for i in c.image_ids if i not in images]
            if missing:
                raise SystemExit(f"{c.path}: {len(missing)} pairs name images that no feature store in --images holds, e.g. {missing[:3]}")
            corpora.append(data.Corpus(f"pairs:{os.path.basename(c.path)}", "pair", vocab, (c, c.image_ids), images, tags))
            paired.update(c.image_ids)
        if args.hybrid:  # the extra images: every stored image that is in no pair
            alone = sorted(i for i in images.where if i not in paired)
            if not alone:
                raise SystemExit("--hybrid: every image in --images is in a pair; give a store of extra images too")
            corpora.append(data.Corpus("images", "image", vocab, alone, images, tags))
    if not corpora:
        raise SystemExit("no pre-training data: give --text, and --images/--captions/--pairs as the variant needs")
    return corpora


def skipped_report(corpora):
    """Lines on the bad records each text corpus left out (tokenised text keeps the list)."""
    texts = [c.items[0] if c.kind == "pair" else c.items for c in corpora if c.kind != "image"]
    return [r for r in (t.report() for t in texts) if r]


def heldout_batches(args, vocab, class_names, n):
    """Fixed masked batches of the held-out sets, the same before and after training."""
    sets = [(f"text:{f}", data.Corpus("text", "text", vocab, data.TokenCorpus(f, vocab, "docs", args.cache_dir)))
            for f in args.heldout_text or []]
    if not args.text_only:
        sets += [(f"captions:{f}", data.Corpus("captions", "caption", vocab, data.TokenCorpus(f, vocab, "lines", args.cache_dir)))
                 for f in args.heldout_captions or []]
        if args.heldout_images:
            images = data.Images(args.heldout_images)
            if images.class_names != class_names:
                raise SystemExit("--heldout-images: other detector classes than the training images")
            sets.append(("images", data.Corpus("images", "image", vocab, sorted(images.where), images, tags=not args.no_tags)))
            if args.aligned or args.hybrid:  # the match objective on pairs never trained on
                for f in args.heldout_pairs or []:
                    c = data.TokenCorpus(f, vocab, "pairs", args.cache_dir)
                    missing = [i for i in c.image_ids if i not in images]
                    if missing:
                        raise SystemExit(f"{f}: {len(missing)} pairs name images that --heldout-images does not hold, e.g. {missing[:3]}")
                    sets.append((f"pairs:{f}", data.Corpus("pairs", "pair", vocab, (c, c.image_ids), images, tags=not args.no_tags)))
    out = {}
    for name, c in sets:
        g = torch.Generator().manual_seed(1234)
        out[name] = [c.batch(np.arange(i, min(i + 64, len(c))), g) for i in range(0, min(len(c), 64 * n), 64)]
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
                    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "tag_ids", "tag_boxes",
                                                "tag_mask", "feats", "boxes", "region_mask") if k in b}
                    right = model.nsp(model.pool(model(**inputs)[0])).argmax(-1) == b["match_labels"]
                    terms["match_acc"] = right.float().mean()
            for k, val in terms.items():
                sums[k] = sums.get(k, 0.0) + val.item()
                counts[k] = counts.get(k, 0) + 1
    model.train()
    return {k: sums[k] / counts[k] for k in sums}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, model, optimizer, scaler, step, args, vocab, class_names, **extra):
    """Everything to resume, written atomically; `extra` adds entries (finetune.py: its head, its generator)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": step, "config": model.cfg.to_dict(), "vocab": vocab.tokens, "class_names": class_names,
            "args": vars(args), "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, **extra}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint whole


def restore(ckpt, optimizer, scaler):
    """--resume: the optimiser, the scaler and the global random states as the checkpoint left them;
    returns its step."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt["scaler"]:
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


def make_model(args, images, vocab_size):
    """A model per --init-from (a Hugging Face BERT directory, our checkpoint) or --model."""
    visual = dict(feat_dim=images.feature_dim, num_labels=len(images.class_names),
                  num_attrs=len(images.attr_names or [])) if images is not None else {}
    drop = {} if args.dropout is None else {"dropout": args.dropout}
    src = args.init_from
    if src and os.path.isdir(src):
        cfg = config_from_hf(src, **visual, **drop)
        return load_bert(VisualBERT(cfg), src), data.Vocab.from_file(os.path.join(src, "vocab.txt"))
    if src:
        ckpt = load_checkpoint(src)
        cfg = Config(**{**ckpt["config"], **drop})
        for k, val in visual.items():
            if getattr(cfg, k) != val:
                raise SystemExit(f"{src}: the checkpoint has {k}={getattr(cfg, k)}, the images have {val}")
        model = VisualBERT(cfg)
        model.load_state_dict(ckpt["model"])
        return model, data.Vocab(ckpt["vocab"], source=src)
    cfg = Config(**{**PRESETS[args.model], "vocab_size": vocab_size, **visual, **drop})
    return VisualBERT(cfg), None


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
# the run


class Objectives(torch.nn.Module):
    """What DDP and torch.compile wrap: forward(batch) -> the pre-training terms (sum, count)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.pretrain_terms(batch)


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


def shard(batch, rank, world):
    """This process's rows of the global batch (every tensor's first axis is the batch)."""
    B = next(iter(batch.values())).shape[0]
    lo, hi = B * rank // world, B * (rank + 1) // world
    return {k: v[lo:hi] for k, v in batch.items()}


def main(argv=None):
    args = p.parse_args(argv)
    variants = [args.unaligned, args.aligned, args.hybrid, args.text_only]
    if sum(variants) != 1:
        p.error("choose exactly one of --unaligned, --aligned, --hybrid, --text-only")
    if args.no_captions and not args.unaligned:
        p.error("--no-captions goes with --unaligned (the U_NC row)")
    device, rank, world = setup_device(args)
    master = rank == 0  # only rank 0 prints, logs and saves
    say = print if master else (lambda *a, **k: None)
    if args.batch_size < world:
        raise SystemExit(f"--batch-size {args.batch_size} is the global batch; it must be at least the {world} processes")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dtype, why = pick_dtype(args, device)
    ctx = autocast(device, dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)

    # data: the toy world unless real data is given
    if not (args.images or args.captions or args.text or args.pairs):
        root = toy.make_toy_world(args.toy_root) if master else args.toy_root
        if world > 1:
            dist.barrier()  # rank 0 made the toy world; the others wait for it
        args.text = [os.path.join(root, "pretrain", "text.txt")]
        args.captions = [os.path.join(root, "pretrain", "captions.txt")]
        args.pairs = [os.path.join(root, "pretrain", "pairs.jsonl")]
        args.images = [os.path.join(root, "features", "pretrain")] + ([os.path.join(root, "features", "extra")] if args.hybrid else [])
        args.heldout_text = args.heldout_text or [os.path.join(root, "heldout", "text.txt")]
        args.heldout_captions = args.heldout_captions or [os.path.join(root, "heldout", "captions.txt")]
        args.heldout_images = args.heldout_images or [os.path.join(root, "features", "heldout")]
        args.heldout_pairs = args.heldout_pairs or [os.path.join(root, "heldout", "pairs.jsonl")]
        vocab_file = os.path.join(root, "vocab.txt")
    else:
        vocab_file = None
    try:
        images = data.Images(args.images) if args.images else None  # with --text-only, it sizes the visual modules
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = load_checkpoint(ckpt_path) if args.resume else None
    if resume is not None:
        args.init_from = ckpt_path
    model, vocab = make_model(args, images, None if vocab_file is None else len(data.Vocab.from_file(vocab_file)))
    if vocab is None:
        if vocab_file is None:
            raise SystemExit("real data needs a vocabulary: give --init-from (a BERT directory or a checkpoint)")
        vocab = data.Vocab.from_file(vocab_file)
    model.to(device)
    try:
        corpora = build_corpora(args, vocab, images)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    dataset = data.PretrainData(corpora, args.batch_size, args.seed)
    class_names = images.class_names if images is not None else None
    heldout = heldout_batches(args, vocab, class_names, args.eval_batches) if master else {}

    # AdamW, no decay on biases and LayerNorms (BERT); linear warm-up, then linear decay to zero
    decay = [p_ for n, p_ in model.named_parameters() if p_.dim() >= 2]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999), eps=1e-6,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    warmup = max(1, int(args.warmup * args.max_steps))
    lr_at = lambda s: args.lr * min((s + 1) / warmup, max(0.0, (args.max_steps - s) / max(1, args.max_steps - warmup)))
    scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None  # fp16 alone needs loss scaling
    step = 0
    if resume is not None:
        step = restore(resume, optimizer, scaler)
        if master:
            trim_log(os.path.join(args.out, "log.jsonl"), step)
        say(f"resuming from {ckpt_path} at step {step}")

    # what runs: the objectives, compiled and/or wrapped in DDP; checkpoints keep the plain model
    run = Objectives(model)
    if args.compile:
        run = torch.compile(run)
    if world > 1:
        # text batches leave the visual modules unused, so DDP must look for unused parameters
        run = DDP(run, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({"argv": sys.argv, "args": vars(args), "world_size": world, "torch": torch.__version__,
                       "python": platform.python_version()}, f, indent=1)
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg.layers} layers, hidden {model.cfg.hidden}")
    say(f"device: {device} x {world} process(es), dtype: {dtype} ({why}), compile: {args.compile}")
    for c in corpora:
        say(f"data: {c.name} ({c.kind}), {len(c)} items")
    say(f"{dataset.steps_per_epoch} steps per epoch, {args.max_steps} steps, global batch {args.batch_size}")
    for line in skipped_report(corpora):
        say("warning: " + line)

    before = evaluate(model, heldout, device, ctx) if heldout and step == 0 else None
    if before:
        say("held-out before: " + ", ".join(f"{k} {v_:.3f}" for k, v_ in before.items()))

    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun: the processes of a machine share it
    workers = args.workers if args.workers is not None else (max(1, min(8, cores - 1)) if device.type == "cuda" else 0)
    loader = data.batches(dataset, range(step, args.max_steps), workers, pin_memory=device.type == "cuda")
    say(f"batches built by {workers} worker process(es)" if workers else "batches built in this process (--workers 0)")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    peak = peak_flops(device, dtype)
    model.train()
    t0, window = time.time(), {"steps": 0, "samples": 0, "tokens": 0, "flops": 0.0}
    curve = [r for r in read_log(os.path.join(args.out, "log.jsonl")) if r.get("phase") == "eval"] if master and step else []
    for name, batch in loader:
        lr = lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        B = next(iter(batch.values())).shape[0]
        T = sum(batch[k].shape[1] for k in ("input_ids", "tag_ids", "feats") if k in batch)
        predicted = sum(int((batch[k] != -100).sum()) for k in ("mlm_labels", "tag_labels") if k in batch)
        batch = to_device(shard(batch, rank, world), device)
        with ctx:
            terms = run(batch)
        # each term divided by its count over the *global* batch; DDP averages gradients over
        # the processes, hence the factor `world`: the same loss and gradient as one process
        sums = torch.stack([s_.float() for s_, _ in terms.values()])
        counts = torch.stack([c_.float() for _, c_ in terms.values()])
        if world > 1:
            dist.all_reduce(counts)
        loss = (sums / counts.clamp(min=1)).sum() * world
        logged = sums.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
        logged = dict(zip(terms, (logged / counts.clamp(min=1)).tolist()))
        total = sum(logged.values())
        if not math.isfinite(total) and scaler is None:
            raise SystemExit(f"step {step + 1}: non-finite loss ({', '.join(f'{k} {v_:.4g}' for k, v_ in logged.items())}); "
                             f"stopping, the last good checkpoint is {ckpt_path}")
        optimizer.zero_grad(set_to_none=True)
        if scaler:  # under fp16 a non-finite gradient makes the scaler skip the step and lower its scale
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        window["steps"] += 1
        window["samples"] += B
        window["tokens"] += B * T
        window["flops"] += train_flops(model.cfg, B, T, predicted)
        if master and (step % args.log_every == 0 or step == args.max_steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            record = {"step": step, "loss": total, "lr": lr, "modality": name, "grad_norm": norm.item(), **logged}
            log.write(json.dumps(record) + "\n")
            log.flush()
            mfu = f"{window['flops'] / dt / peak:.1%}" if peak else "n/a"
            eta = dt / window["steps"] * (args.max_steps - step)
            say(f"step {step}/{args.max_steps} | {name:<20} | loss {total:.3f} (" + " ".join(f"{k} {v_:.3f}" for k, v_ in logged.items())
                + f") | lr {lr:.2e} | norm {norm.item():.2f} | {dt / window['steps'] * 1000:.0f} ms/step | {window['samples'] / dt:.0f} samples/s"
                + f" | {window['tokens'] / dt:.0f} tokens/s | MFU {mfu} | ETA {eta / 60:.1f} min", flush=True)
            t0, window = time.time(), {"steps": 0, "samples": 0, "tokens": 0, "flops": 0.0}
        if master and (step % args.save_every == 0 or step == args.max_steps):
            save_checkpoint(ckpt_path, model, optimizer, scaler, step, args, vocab, class_names)
        if heldout and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            curve.append({"step": step, **evaluate(model, heldout, device, ctx)})
            log.write(json.dumps({"phase": "eval", **curve[-1]}) + "\n")
            log.flush()
            say(f"held-out at step {step}: " + ", ".join(f"{k} {v_:.3f}" for k, v_ in curve[-1].items() if k != "step"))
    if log:
        log.close()

    after = evaluate(model, heldout, device, ctx) if heldout else None
    if after:
        if before:
            say("held-out loss   before  ->  after")
            for k in after:
                say(f"  {k:<8} {before.get(k, float('nan')):9.3f} -> {after[k]:7.3f}")
        else:
            say("held-out after: " + ", ".join(f"{k} {v_:.3f}" for k, v_ in after.items()))
        curve.append({"step": step, **after})
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({"before": before, "after": after, "step": step, "curve": curve}, f, indent=1)
    for line in skipped_report(corpora):  # said again at the end, where it is seen
        say("warning: " + line)
    say(f"checkpoint: {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return after


if __name__ == "__main__":
    main()
