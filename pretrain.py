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

import os
import time

import numpy as np
import torch

import common
import data
import guards
import storage
import toy
from common import all_sum, print0
from model import PRESETS, peak_flops, train_flops

# -----------------------------------------------------------------------------
# settings: every flag, in one place; `python pretrain.py -h` is the manual

parser = guards.ArgumentParser(description="Pre-train U-VisualBERT and its variants (docs/METHOD.md §3).")
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
group.add_argument("--text-rate", type=guards.FRACTION, default=1.0,
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
group.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                   help="size preset, unless --init-from sets it (default: %(default)s)")
group.add_argument("--init-from", metavar="PATH",
                   help="a Hugging Face BERT directory or one of our checkpoints (ckpt.pt)")
group.add_argument("--max-steps", type=guards.POSITIVE_INT, default=1200, help="optimiser steps (default: %(default)s)")
group.add_argument("--batch-size", type=guards.POSITIVE_INT, default=64,
                   help="the global batch: with N processes each takes 1/N of it (default: %(default)s)")
group.add_argument("--grad-accum", type=guards.POSITIVE_INT, default=1, metavar="N",
                   help="each process takes its share of the batch in N micro-batches, adding up their gradients "
                        "(less memory)")
group.add_argument("--lr", type=guards.NON_NEGATIVE, default=1e-3,
                   help="peak learning rate (default: %(default)s; paper, BERT-base: 6e-5)")
group.add_argument("--warmup", type=guards.SHARE, default=0.02, help="share of steps for linear warm-up (authors: 2%%)")
group.add_argument("--weight-decay", type=guards.NON_NEGATIVE, default=0.01, help="AdamW's (default: %(default)s)")
group.add_argument("--clip", type=guards.POSITIVE, default=1.0, help="gradient-norm clip (default: %(default)s)")
group.add_argument("--dropout", type=guards.SHARE, default=None, help="override the model's dropout")
group = parser.add_argument_group("run")
group.add_argument("--out", default="out/pretrain",
                   help="output folder: log.jsonl, ckpt.pt, args.json, eval.json (default: %(default)s)")
group.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.pt; the rest of the command must be the same")
group.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (a new run refuses it)")
group.add_argument("--seed", type=int, default=0)
group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if there is one)")
group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)")
group.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
group.add_argument("--workers", type=guards.COUNT, default=None,
                   help="processes building batches (default: on a GPU, this process's share of the cores less one, at "
                        "most 8; 0 on a CPU)")
group.add_argument("--log-every", type=guards.POSITIVE_INT, default=50, help="steps (default: %(default)s)")
group.add_argument("--save-every", type=guards.POSITIVE_INT, default=1000,
                   help="write OUT/ckpt.pt every this many steps, and at the end (default: %(default)s)")
group.add_argument("--eval-batches", type=guards.POSITIVE_INT, default=4,
                   help="batches per held-out set (default: %(default)s)")
group.add_argument("--eval-every", type=guards.COUNT, default=0,
                   help="also evaluate the held-out sets every this many steps (log.jsonl lines with phase \"eval\"): "
                        "how far the objectives have converged")
group.add_argument("--keep-checkpoints", action="store_true",
                   help="at each --eval-every evaluation also keep the checkpoint as OUT/ckpt-STEP.pt: the grounding "
                        "probe along the run (reproduce.py)")
# every flag that names a path, and what it must be (guards.check_path)
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
    corpora = [storage.TokenCorpus(f, vocab, kind, args.cache_dir) for f in files or []]
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
        print0("warning: " + line)


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


def use_toy_world(args, world):
    """With no data flags, the toy world's files (made on first use); returns its vocabulary file
    (None with real data)."""
    if args.images or args.captions or args.text or args.pairs:
        return None
    root = args.toy_root
    common.rank0_first(lambda: toy.make_toy_world(root), world)
    args.text = [os.path.join(root, "pretrain", "text.txt")]
    args.captions = [os.path.join(root, "pretrain", "captions.txt")]
    args.pairs = [os.path.join(root, "pretrain", "pairs.jsonl")]
    args.images = [os.path.join(root, "features", s) for s in ("pretrain", "extra")[:2 if args.hybrid else 1]]
    args.heldout_text = args.heldout_text or [os.path.join(root, "heldout", "text.txt")]
    args.heldout_captions = args.heldout_captions or [os.path.join(root, "heldout", "captions.txt")]
    args.heldout_images = args.heldout_images or [os.path.join(root, "features", "heldout")]
    args.heldout_pairs = args.heldout_pairs or [os.path.join(root, "heldout", "pairs.jsonl")]
    return os.path.join(root, "vocab.txt")


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


# -----------------------------------------------------------------------------
# evaluation and logging


@torch.no_grad()
def evaluate(model, sets, device, ctx):
    """Mean held-out loss of each objective over all held-out batches, and on pairs the share of
    them whose match or mismatch the model gets right (match_acc; chance 0.5)."""
    model.eval()
    sums, counts = {}, {}
    for batches in sets.values():
        for b in batches:
            b = common.to_device(b, device)
            with ctx:
                loss_sums, loss_counts, right = model.pretrain_loss(b)
            terms = dict(zip(model.count_targets(b), (loss_sums / loss_counts.clamp(min=1)).tolist()))
            if "match_labels" in b:
                terms["match_acc"] = (right / len(b["match_labels"])).item()
            for k, val in terms.items():
                sums[k] = sums.get(k, 0.0) + val
                counts[k] = counts.get(k, 0) + 1
    model.train()
    return {k: sums[k] / counts[k] for k in sums}


def status_line(r, max_steps, dt, steps, samples, tokens, mfu):
    """A logging step's line: record r's losses, then the speed over the `steps` steps of `dt` seconds
    since the last line, of all processes together."""
    shown = ("step", "loss", "lr", "modality", "grad_norm")  # in the line's own fields
    terms = " ".join(f"{k} {value:.3f}" for k, value in r.items() if k not in shown)
    return (f"step {r['step']}/{max_steps} | {r['modality']:<20} | loss {r['loss']:.3f} ({terms}) | lr {r['lr']:.2e} | "
            f"norm {r['grad_norm']:.2f} | {dt / steps * 1000:.0f} ms/step | {samples / dt:.0f} samples/s | "
            f"{tokens / dt:.0f} tokens/s | MFU {mfu} | ETA {dt / steps * (max_steps - r['step']) / 60:.1f} min")


def write_eval(args, before, after, step, curve):
    """The held-out losses before -> after, said and written to OUT/eval.json with the curve."""
    if before:
        print0("held-out loss   before  ->  after")
        for k in after:
            print0(f"  {k:<8} {before.get(k, float('nan')):9.3f} -> {after[k]:7.3f}")
    else:
        print0("held-out after: " + ", ".join(f"{k} {value:.3f}" for k, value in after.items()))
    curve.append({"step": step, **after})
    result = {"before": before, "after": after, "step": step, "curve": curve}
    # whole or not at all: reproduce.py takes eval.json to mean the run is done
    storage.write_json(os.path.join(args.out, "eval.json"), result, indent=1)


# -----------------------------------------------------------------------------
# the run: settings, data, model, optimiser, then the loop


def main(argv=None):
    args = parser.parse_args(argv)  # every setting checked before any work
    if sum([args.unaligned, args.aligned, args.hybrid, args.text_only]) != 1:
        parser.error("choose exactly one of --unaligned, --aligned, --hybrid, --text-only")
    if args.no_captions and not args.unaligned:
        parser.error("--no-captions goes with --unaligned (the U_NC row)")
    guards.check_paths(args, PATH_FLAGS)
    with guards.OutFolder(args.out, args.resume, args.overwrite) as out, guards.Interrupt() as ctrl_c:
        try:
            return train(args, out, ctrl_c)
        except (storage.WriteError, storage.NonFinite) as e:  # a full disk, a corrupt feature store
            raise SystemExit(f"{guards.one_line(e)}; stopping, {common.last_good(out.saved)}") from None


# what a resumed run may change; any other setting makes it another run, which --resume refuses
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "save_every", "log_every", "device", "dtype", "compile", "workers",
                     "toy_root", "cache_dir", "grad_accum")


def train(args, out, ctrl_c):
    """The run: data, model, optimiser, then the loop. out: --out, made (out.make()) once the inputs
    are read; ctrl_c: a Ctrl-C or SIGTERM (the loop saves and stops at the end of the step)."""
    device, rank, world = common.init_device(args.device)
    common.check_batch(args.batch_size, world, args.grad_accum)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dtype, why = common.pick_dtype(args.dtype, device)
    ctx = common.autocast(device, dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
    torch.backends.cudnn.allow_tf32 = True

    # data
    vocab_file = use_toy_world(args, world)  # the toy world unless real data is given
    try:  # the image stores of --images; with --text-only they size the visual modules
        images = data.Images(args.images) if args.images else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    class_names = images.class_names if images is not None else None

    # model: new, from --init-from, or with --resume from OUT/ckpt.pt
    ckpt_path, log_file = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = storage.load_checkpoint(ckpt_path) if args.resume else None
    if resume is not None:
        guards.check_resume(resume.get("args", {}), args, RESUME_MAY_CHANGE, ckpt_path)
    src = ckpt_path if resume is not None else args.init_from
    model, vocab = common.make_model(args, images, vocab_file, src, resume)  # real data without a vocabulary stops
    model.to(device)
    corpora, heldout = load_corpora(args, vocab, images, class_names, rank, world)
    dataset = data.PretrainData(corpora, args.batch_size, args.seed, rank, world)
    out.make()  # only now: a bad input leaves no output folder behind

    # optimiser
    optimizer, lr_at, scaler = common.make_optimizer(model.parameters(), args, args.max_steps, device, dtype)
    step = 0
    if resume is not None:
        step = storage.restore(resume, optimizer, scaler)
        if rank == 0:
            guards.trim_log(log_file, step)
        print0(f"resuming from {ckpt_path} at step {step}")
    pretrain_loss = common.wrap(common.Loss(model.pretrain_loss, model), device, world, args.compile)
    guards.write_args(args, world)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg.layers} layers, hidden {model.cfg.hidden}")
    print0(f"device: {device} x {world} process(es), dtype: {dtype} ({why}), compile: {args.compile}")
    for c in corpora:
        print0(f"data: {c.name} ({c.kind}), {len(c)} items")
    micro_rows = f" in {args.grad_accum} micro-batches of {args.batch_size // (world * args.grad_accum)} per process"
    print0(f"{dataset.steps_per_epoch} steps per epoch, {args.max_steps} steps, global batch {args.batch_size}"
           + (micro_rows if args.grad_accum > 1 else ""))
    warn_skipped(corpora)
    before = resume.get("heldout_before") if resume is not None else None  # the held-out losses at step 0
    before = evaluate(model, heldout, device, ctx) if heldout and step == 0 else before
    if before:
        print0("held-out before: " + ", ".join(f"{k} {value:.3f}" for k, value in before.items()))
    curve = [r for r in guards.read_log(log_file) if r.get("phase") == "eval"] if rank == 0 and step else []

    # the loop: steps step + 1 to --max-steps; rank 0 logs, prints and saves. The host reads the device
    # on logging and saving steps alone: the check for a non-finite loss waits for them.
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # a machine's processes share it
    workers = args.workers if args.workers is not None else (max(1, min(8, cores - 1)) if device.type == "cuda" else 0)
    loader = data.batches(dataset, range(step, args.max_steps), workers, pin_memory=device.type == "cuda")
    print0(f"batches built by {workers} worker process(es)" if workers
           else "batches built in this process (--workers 0)")
    log = guards.Log(log_file, "a", write=rank == 0)
    model.train()
    t0, pending = time.time(), []  # pending: the steps whose losses the host has not read yet
    out.saved = (ckpt_path, step) if step else None
    window = np.zeros(4)  # this process's steps, samples, tokens and FLOPs since the last status line
    for name, batch in loader:  # this process's rows of the global batch, on the host
        lr = lr_at(step)
        micro = common.micro_batches(batch, args.grad_accum, device)
        # each objective's sum is divided by its count over the global batch, which the batch alone gives
        # before any forward: N micro-batches on P processes take the step one process takes on the whole batch
        names, counts = common.global_counts(model, micro)
        share = common.pretrain_share(counts)
        norm, sums = common.train_step(pretrain_loss, micro, share, optimizer, scaler, lr, args.clip, ctx, world)
        step += 1

        B = next(iter(batch.values())).shape[0]
        T = sum(batch[k].shape[1] for k in ("input_ids", "tag_ids", "feats") if k in batch)
        predicted = sum(int((batch[k] != -100).sum()) for k in ("mlm_labels", "tag_labels") if k in batch)
        window += [1, B, B * T, train_flops(model.cfg, B, T, predicted)]
        pending.append((step, names, sums, counts))
        log_now = step % args.log_every == 0 or step == args.max_steps
        stop = ctrl_c.agreed()  # a signal from here on stops the next step
        save_now = step % args.save_every == 0 or step == args.max_steps or stop
        eval_now = rank == 0 and heldout and args.eval_every and step % args.eval_every == 0 and step < args.max_steps
        if log_now or save_now:
            terms, pending = common.read_losses(pending, scaler, out.saved)[-1], []
        if log_now:
            dt = time.time() - t0
            samples, tokens, flops = all_sum(torch.tensor(window[1:], device=device)).tolist()
            peak = peak_flops(device, dtype)
            mfu = f"{flops / dt / (peak * world):.1%}" if peak else "n/a"
            record = {"step": step, "loss": sum(terms.values()), "lr": lr, "modality": name, "grad_norm": norm.item(),
                      **terms}
            print0(status_line(record, args.max_steps, dt, window[0], samples, tokens, mfu), flush=True)
            log.write(record)
            t0, window = time.time(), np.zeros(4)
        if save_now and rank == 0:
            storage.save_checkpoint(ckpt_path, model, optimizer, scaler, step, args, vocab, class_names,
                                    heldout_before=before)
        out.saved = (ckpt_path, step) if save_now else out.saved
        if eval_now:
            if args.keep_checkpoints:
                storage.save_checkpoint(os.path.join(args.out, f"ckpt-{step}.pt"), model, optimizer, scaler, step,
                                        args, vocab, class_names, heldout_before=before)
            curve.append({"step": step, **evaluate(model, heldout, device, ctx)})
            log.write({"phase": "eval", **curve[-1]})
            print0(f"held-out at step {step}: "
                   + ", ".join(f"{k} {v:.3f}" for k, v in curve[-1].items() if k != "step"))
        if stop:
            ctrl_c.stop(f"stopped at step {step}: {ckpt_path} saved; the same command with --resume goes on", world)
    log.close()

    after = evaluate(model, heldout, device, ctx) if heldout else None
    if after:
        write_eval(args, before, after, step, curve)
    warn_skipped(corpora)  # said again at the end, where it is seen
    print0(f"checkpoint: {ckpt_path}")
    common.end_processes(world)
    return after


if __name__ == "__main__":
    main()
