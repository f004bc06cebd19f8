"""
Fine-tune U-VisualBERT on the paper's four downstream tasks (docs/METHOD.md §6) and report their metrics.

    python finetune.py --task vqa --init-from out/pretrain/ckpt.pt        # VQA 2.0: soft accuracy
    python finetune.py --task nlvr2 --init-from out/pretrain/ckpt.pt      # NLVR2: accuracy and consistency
    python finetune.py --task retrieval --init-from out/pretrain/ckpt.pt  # Flickr30K image retrieval: R@1, R@5, R@10
    python finetune.py --task refcoco --init-from out/pretrain/ckpt.pt    # RefCOCO+: the top region's IoU >= 0.5

With no data flags a task uses the toy world's files (made by toy.py on first use); --data DIR and
--features STORE... point it at the real benchmark files (docs/METHOD.md §7) and a feature store made by
extract_features.py. A run prints each split's result beside a trivial baseline and writes them to OUT
(see -h). Under torchrun the same command trains data-parallel, as pretrain.py does:

    torchrun --standalone --nproc_per_node 8 finetune.py --task vqa --init-from out/pretrain/ckpt.pt

The file reads from the top: the settings, building the model, and one training loop that all four
tasks share. The tasks themselves (their metrics, loaders of the real file formats, heads, losses,
evaluations and baselines) are in tasks.py; their split into rare and common items is in analysis.py.
"""

import argparse
import copy
import os
import time

import numpy as np
import torch

import analysis
import common
import data
import guards
import storage
import toy
from common import all_sum, print0, shard
from model import PRESETS
from tasks import TASKS, chunks, steps_per_epoch

# -----------------------------------------------------------------------------
# settings: every flag, in one place; `python finetune.py -h` is the manual

# Defaults sized for the toy world: the epochs at which a text-only BERT as long as the first command
# (pretrain.py --text-only, 1,200 steps) learns each task within 2 min on a 2-core CPU (docs/METHOD.md section
# 15; NLVR2's 0.625 keeps its steps on a training set four times larger, section 18); reproduce.py sets its own
# (section 14). For the real benchmarks with BERT-base use the paper's settings
# (docs/METHOD.md §6), listed in PAPER and in --help. VQA and retrieval learn at 3e-4, not 1e-3, at which the
# word-to-tag match they need is not found.
DEFAULTS = {  # task: epochs, batch size, peak learning rate
    "vqa": dict(epochs=1.6, batch_size=32, lr=3e-4),
    "nlvr2": dict(epochs=0.625, batch_size=32, lr=5e-4),
    "retrieval": dict(epochs=2, batch_size=32, lr=3e-4),
    "refcoco": dict(epochs=5, batch_size=32, lr=1e-3),
}
PAPER = {
    "vqa": "--epochs 8 --batch-size 32 --lr 5e-5",
    "nlvr2": "--epochs 8 --batch-size 32 --lr 2e-5 --task-pretrain-epochs 5 (at most)",
    "retrieval": "--epochs 0.28 --batch-size 8 --lr 5e-5 (5K steps of 8 on the 145K training captions)",
    "refcoco": "--epochs 12 --batch-size 32 --lr 5e-5",
}
TOY = {  # task: its folder under toy_world/tasks, its feature stores under toy_world/features
    "vqa": ("vqa", ["vqa_train", "vqa_val"]),
    "nlvr2": ("nlvr2", ["nlvr2_train", "nlvr2_dev", "nlvr2_test1"]),
    "retrieval": ("flickr30k", ["flickr30k"]),
    "refcoco": ("refcoco+", ["refcoco"]),
}
REAL_DATA = """
real benchmarks (docs/METHOD.md §7): --data DIR holds the task's files under their official names, and
--features the feature stores of its images (extract_features.py; several stores are read as one):
  vqa        DIR/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json,
             DIR/v2_mscoco_{train2014,val2014}_annotations.json;
             trains on train2014, reports val2014. COCO images are found as "42" or "COCO_val2014_000000000042".
  nlvr2      DIR/{train,dev,test1}.json (test2.json too if present); images "dev-850-0-img0", "dev-850-0-img1".
  retrieval  DIR/dataset_flickr30k.json (Karpathy's split); images by file stem ("1000092795"); reports test.
  refcoco    DIR/refs(unc).p and DIR/instances.json (RefCOCO+, UNC split; the COCO train2014 images);
             reports val, testA, testB.
paper settings for BERT-base (docs/METHOD.md §6):
""" + "\n".join(f"  {t:<10} {s}" for t, s in PAPER.items())


def toy_defaults(key):
    return "toy: " + ", ".join(f"{t} {v[key]:g}" for t, v in DEFAULTS.items())


parser = guards.ArgumentParser(description="Fine-tune U-VisualBERT on VQA, NLVR2, Flickr30K retrieval or "
                                           "RefCOCO+ (docs/METHOD.md §6).",
                               epilog=REAL_DATA, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", required=True, choices=list(TOY), help="which downstream task")
group = parser.add_argument_group("data (default: the toy world's task files and feature stores)")
group.add_argument("--data", metavar="DIR",
                   help="folder holding the task's files under their official names (see below)")
group.add_argument("--features", nargs="+", metavar="STORE",
                   help="feature stores holding every image the task's files name")
group.add_argument("--toy-root", default=toy.TOY_DIR, metavar="DIR", help="where the toy world is made and cached")
group.add_argument("--train-fraction", type=guards.FRACTION, default=1.0, metavar="F",
                   help="train on the first ceil(F * N) of the N training examples (retrieval: images) in one "
                        "fixed order, the same for every --seed, so a smaller fraction's examples are among a "
                        "larger one's")
group.add_argument("--min-answer-count", type=guards.POSITIVE_INT, default=9, metavar="N",
                   help="vqa: the answer set is every answer that is the multiple_choice_answer of at least this "
                        "many training questions (or questions of --answers)")
group.add_argument("--answers", nargs="+", metavar="FILE",
                   help="vqa: count the answer set over these VQA annotation files instead of the training "
                        "questions (train2014 + val2014 with the default count of 9 gives the usual 3,129 answers), "
                        "or read it from one ans2label JSON file {\"answer\": index}")
group = parser.add_argument_group("model and optimisation (docs/METHOD.md §6); a task's defaults suit the toy "
                                  "world, see the paper's below")
group.add_argument("--init-from", metavar="PATH",
                   help="our checkpoint (ckpt.pt), a Hugging Face BERT directory (the Base row), "
                        "or nothing: random weights of --model")
group.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="size preset when there is no --init-from")
group.add_argument("--no-tags", action="store_true", help="regions only, no detector tags (the _NT rows)")
group.add_argument("--epochs", type=guards.POSITIVE, metavar="E",
                   help=f"epochs, may be fractional ({toy_defaults('epochs')})")
group.add_argument("--batch-size", type=guards.POSITIVE_INT, metavar="B",
                   help="examples per step, the global batch: with N processes (torchrun) each takes 1/N of it "
                        "(toy: 32)")
group.add_argument("--grad-accum", type=guards.POSITIVE_INT, default=1, metavar="N",
                   help="each process takes its share of the batch in N micro-batches, adding up their gradients "
                        "(less memory)")
group.add_argument("--lr", type=guards.NON_NEGATIVE, metavar="LR", help=f"peak learning rate ({toy_defaults('lr')})")
group.add_argument("--warmup", type=guards.SHARE, default=0.1, metavar="F",
                   help="share of steps for linear warm-up, then linear decay to zero")
group.add_argument("--weight-decay", type=guards.NON_NEGATIVE, default=0.01, metavar="W")
group.add_argument("--clip", type=guards.POSITIVE, default=1.0, metavar="NORM", help="gradient-norm clip")
group.add_argument("--dropout", type=guards.SHARE, default=None, metavar="P", help="override the model's dropout")
group.add_argument("--hard-negatives", type=guards.POSITIVE_INT, default=4, metavar="N",
                   help="retrieval: the wrong image of each positive is the most tag-alike of N random other images "
                        "(1: a random one)")
group.add_argument("--test-images", type=guards.POSITIVE_INT, default=None, metavar="N",
                   help="retrieval: rank among the first N test images only (a quicker check; the paper ranks all "
                        "1,000)")
group.add_argument("--task-pretrain-epochs", type=guards.COUNT, default=0, metavar="N",
                   help="nlvr2: first this many epochs of mask-and-predict on NLVR2's own data, keeping the epoch "
                        "with the best dev MLM loss (paper: at most 5)")
group = parser.add_argument_group("run")
group.add_argument("--out", metavar="DIR",
                   help="output folder (default out/finetune/TASK): results.json, baseline.json, log.jsonl, "
                        "args.json, ckpt.pt")
group.add_argument("--seed", type=int, default=0)
group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if there is one)")
group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)")
group.add_argument("--compile", action="store_true",
                   help="torch.compile the model for the training steps (worth it on a GPU)")
group.add_argument("--log-every", type=guards.POSITIVE_INT, default=50, metavar="STEPS")
group.add_argument("--save-every", type=guards.POSITIVE_INT, default=500, metavar="STEPS",
                   help="write OUT/ckpt.pt every this many steps, and at the end")
group.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.pt; the rest of the command must be the same")
group.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (a new run refuses it)")
group.add_argument("--eval-batch-size", type=guards.POSITIVE_INT, default=256, metavar="N",
                   help="sequences per forward pass when evaluating")
# every flag that names a path, and what it must be (guards.check_path)
PATH_FLAGS = {"data": "folder", "features": "folder", "answers": "file", "init_from": "checkpoint", "out": "out",
              "toy_root": "out"}


# -----------------------------------------------------------------------------
# the task, the model and its head


def load_task(args, world):
    """The task (the toy world's unless --data/--features are given), the model of --init-from (see -h;
    random weights of --model with the toy vocabulary when none; with --resume, the run's own
    checkpoint) and the task's head, and with --resume that checkpoint; a bad input is one line naming it."""
    toy_vocab = None
    if args.data is None:
        common.rank0_first(lambda: toy.make_toy_world(args.toy_root), world)
        folder, stores = TOY[args.task]
        args.data = os.path.join(args.toy_root, "tasks", folder)
        args.features = [os.path.join(args.toy_root, "features", s) for s in stores]
        toy_vocab = os.path.join(args.toy_root, "vocab.txt")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = load_resume(ckpt_path, args) if args.resume else None
    src = ckpt_path if resume is not None else args.init_from

    def fits_features(cfg, ckpt):  # the attribute head may differ: fine-tuning does not use it
        sizes = (("feat_dim", "feature size", images.feature_dim),
                 ("num_labels", "detector classes", len(images.class_names)))
        for k, what, have in sizes:
            if getattr(cfg, k) != have:
                raise SystemExit(f"{src}: the checkpoint was pre-trained with {what} {getattr(cfg, k)}, the feature "
                                 f"stores {' '.join(s.path for s in images.stores)} have {have}: use features from "
                                 f"the same extractor")
        if ckpt.get("class_names") and list(ckpt["class_names"]) != list(images.class_names):
            print0(f"warning: {src} was pre-trained with other detector class names than the feature stores have")

    try:
        images = data.Images(args.features)
        model, vocab = common.make_model(args, images, toy_vocab, src, resume, fits_features)
        task = TASKS[args.task](args, vocab, images.class_names)  # its inputs, head, forward and loss
        task.load_data(args, images, args.data)  # its files: the splits, the training examples
        if args.train_fraction != 1:
            task.keep_train(args.train_fraction)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(str(e).strip('"')) from None
    head = task.make_head(model)
    if resume is not None:
        storage.load_weights(head, resume["head"], ckpt_path)
    return task, model, head, resume


# what a resumed run may change; any other setting makes it another run, which --resume refuses
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "save_every", "log_every", "eval_batch_size", "device", "dtype",
                     "compile", "toy_root", "grad_accum")


def load_resume(path, args):
    """OUT/ckpt.pt of an earlier run of this same command, or one clear line naming the file."""
    ckpt = storage.load_checkpoint(path)
    if not isinstance(ckpt, dict) or "head" not in ckpt:
        raise SystemExit(f"{path}: not a checkpoint of finetune.py (no head inside); --resume goes on from a run of "
                         f"this command in --out")
    guards.check_resume(ckpt["args"], args, RESUME_MAY_CHANGE, path)
    return ckpt


# -----------------------------------------------------------------------------
# NLVR2's task-specific pre-training


def task_pretrain(args, task, model, ctx, rank, world):
    """NLVR2's task-specific pre-training (docs/METHOD.md §6): --task-pretrain-epochs epochs of
    mask-and-predict on its own sentences and images (task.pretrain_batch), keeping the epoch with the
    best dev MLM loss. Each objective's sum is divided by its count over the global batch, as in pretrain.py."""
    dev = task.splits.get("dev") or task.splits["train"][: len(task.splits["train"]) // 10]
    attrs = model.cfg.num_attrs == len(task.images.attr_names or [])
    dev_batches = [task.pretrain_batch(items, data.RowRandom(1234, i, range(len(items))), attrs)  # fixed masks
                   for i, items in enumerate(chunks(dev, args.batch_size))]

    @torch.no_grad()
    def dev_mlm():
        model.eval()
        with ctx:
            losses = [mlm_loss(*model.pretrain_loss(common.to_device(b, task.device))) for b in dev_batches]
        model.train()
        return float(np.mean(losses))

    def mlm_loss(sums, counts, _):  # the first objective is text MLM
        return (sums[0] / counts[0].clamp(min=1)).item()

    steps = args.task_pretrain_epochs * steps_per_epoch(args, task)
    optimizer, lr_at, scaler = common.make_optimizer(model.parameters(), args, steps, task.device, args.dtype)
    pretrain_loss = common.wrap(common.Loss(model.pretrain_loss, model), task.device, world)
    best, step = (float("inf"), None, 0), 0
    print0(f"task-specific pre-training: {args.task_pretrain_epochs} epochs; dev MLM loss before {dev_mlm():.3f}")
    model.train()
    for epoch in range(args.task_pretrain_epochs):
        order = np.random.default_rng([args.seed, 99, epoch]).permutation(len(task.train))
        for idx in chunks(order, args.batch_size)[: steps // args.task_pretrain_epochs]:
            n = len(idx)  # this process builds its rows of the global batch alone
            rng = data.RowRandom(args.seed, step, range(n * rank // world, n * (rank + 1) // world), n)
            b = task.pretrain_batch([task.train[i] for i in idx], rng, attrs)
            micro = common.micro_batches(b, args.grad_accum, task.device)
            _, counts = common.global_counts(model, micro)  # each objective's sum over the global batch's count
            _, sums = common.train_step(pretrain_loss, micro, common.pretrain_share(counts), optimizer, scaler,
                                        lr_at(step), args.clip, ctx, world)
            step += 1
        loss, mlm = (all_sum(sums) / counts).sum().item(), dev_mlm()
        print0(f"task-specific pre-training epoch {epoch + 1}: train loss {loss:.3f}, dev MLM loss {mlm:.3f}")
        if mlm < best[0]:
            best = (mlm, copy.deepcopy(model.state_dict()), epoch + 1)
    model.load_state_dict(best[1])
    print0(f"kept epoch {best[2]} (dev MLM loss {best[0]:.3f})")
    return {"task_pretrain_epoch": best[2], "dev_mlm": best[0]}


# -----------------------------------------------------------------------------
# the evaluation and the run


def report(args, task, model, head, ctx, log, t_start, rank):
    """Every split the data has, each beside the baseline: OUT/results.json, OUT/baseline.json, a table.
    Every process evaluates all of it (the same weights, the same numbers); rank 0 alone writes."""
    model.eval(), head.eval()
    results = {"task": args.task}
    baseline = {"task": args.task, "baseline": task.baseline_name}
    for obj in (results, baseline):  # docs/METHOD.md section 13: an item is rare when the rarest class its
        obj["by_class"] = {"rare_below": analysis.RARE}  # text names is named by fewer training examples than this
    namer = analysis.ClassNamer(task.class_names)  # which detector classes a text names
    named_train = [namer(t) for t in task.train_texts()]
    with ctx, torch.no_grad():
        for s in task.eval_splits:  # each item's scores -> the metrics, and the same over the rare and the common items
            named = [namer(t) for t in task.texts(task.splits[s])]
            for obj, scores in ((results, task.item_scores(model, head, s)), (baseline, task.baseline_scores(s))):
                obj[s], obj["by_class"][s] = task.metrics(s, scores), analysis.by_class(named, named_train, scores)
    if task.skipped.files:
        results["skipped"] = {file: n for file, (n, _) in task.skipped.files.items()}
    # results.json last and whole: reproduce.py takes it to mean the run is done
    for name, obj in (("baseline.json", baseline), ("results.json", results)):
        if rank == 0:
            storage.write_json(os.path.join(args.out, name), obj, indent=1)
    log.write({"phase": "eval", "results": results, "baseline": baseline})
    log.close()
    for line in task.warnings():
        print0(line)
    print0(f"\n{args.task}: result vs baseline ({task.baseline_name}), {(time.time() - t_start) / 60:.1f} min in all")
    print0(f"{'split':<8} {'metric':<16} {'result':>8} {'baseline':>9}")
    for s in task.eval_splits:
        for k, value in results[s].items():
            print0(f"{s:<8} {k:<16} {value:8.3f} {baseline[s][k]:9.3f}")
    for s in task.eval_splits:  # the first metric on the rare and the common items
        k = next(iter(results[s]))
        for g, r in results["by_class"][s].items():
            if r["items"]:
                base = baseline["by_class"][s][g][k]
                print0(f"{s:<8} {k + ' ' + g:<16} {r[k]:8.3f} {base:9.3f}  ({r['items']} items)")
    print0(f"results: {os.path.join(args.out, 'results.json')}, fine-tuned model: {os.path.join(args.out, 'ckpt.pt')}")
    return results


def parse_args(argv=None):
    """The command line, with the task's defaults filled in and the flags checked together."""
    args = parser.parse_args(argv)
    for k, v in DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.task_pretrain_epochs and args.task != "nlvr2":
        parser.error("--task-pretrain-epochs is NLVR2's task-specific pre-training (docs/METHOD.md §6)")
    if not 0 < args.train_fraction <= 1:
        parser.error(f"--train-fraction {args.train_fraction}: a fraction of the training set, in (0, 1]")
    if (args.data is None) != (args.features is None):
        parser.error("--data and --features go together: the task's files and the stores of their images")
    if args.answers and args.task != "vqa":
        parser.error("--answers is VQA's answer set")
    guards.check_paths(args, PATH_FLAGS)
    args.out = args.out or os.path.join("out", "finetune", args.task)
    return args


def main(argv=None):
    args = parse_args(argv)  # every setting checked before any work
    with guards.OutFolder(args.out, args.resume, args.overwrite) as out, guards.Interrupt() as ctrl_c:
        try:
            return train(args, out, ctrl_c)
        except (storage.WriteError, storage.NonFinite) as e:  # a full disk, a corrupt feature store
            raise SystemExit(f"{guards.one_line(e)}; stopping, {common.last_good(out.saved)}") from None


def train(args, out, ctrl_c):
    """The run: the task, the model, the optimiser, the loop, the evaluation. out: --out, made
    (out.make()) once the inputs are read; ctrl_c: a Ctrl-C or SIGTERM (the loop saves and stops
    at the end of the step)."""
    device, rank, world = common.init_device(args.device)  # under torchrun: this process's rank of `world`
    common.check_batch(args.batch_size, world, args.grad_accum)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.dtype, why = common.pick_dtype(args.dtype, device)
    ctx = common.autocast(device, args.dtype)
    t_start = time.time()

    # data, model and head
    task, model, head, resume = load_task(args, world)
    task.device = device
    model.to(device), head.to(device)

    # optimiser
    steps = max(1, round(args.epochs * steps_per_epoch(args, task)))
    optimizer, lr_at, scaler = common.make_optimizer([*model.parameters(), *head.parameters()], args, steps, device,
                                                     args.dtype)
    gen = torch.Generator().manual_seed(args.seed)  # the task's own draws (retrieval's negatives)
    start, losses = 0, []
    if resume is not None:  # the state after step `start`: weights, optimiser, random states, the log's open window
        start, losses = storage.restore(resume, optimizer, scaler), resume["losses"]
        gen.set_state(resume["gen"])
    out.make()  # only now: a bad input leaves no output folder behind
    guards.write_args(args, world)
    print0(f"task: {args.task}, from {args.init_from or f'random weights ({args.model})'}, "
           f"{'no tags' if args.no_tags else 'with tags'}")
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters + head "
           f"{sum(t.numel() for t in head.parameters()) / 1e6:.2f}M, "
           f"{model.cfg.layers} layers, hidden {model.cfg.hidden}")
    print0(f"device: {device} x {world} process(es), dtype: {args.dtype} ({why}), compile: {args.compile}")
    print0("data: " + ", ".join(f"{s} {len(x)}" for s, x in task.splits.items())
           + f" {task.unit}; {len(task.images.where)} images in {len(task.images.stores)} stores")
    for line in task.info + task.warnings():
        print0(line)
    print0(f"{steps_per_epoch(args, task)} steps per epoch, {steps} steps, global batch {args.batch_size}, "
           f"lr {args.lr:g}" + (f", {args.grad_accum} micro-batches per process" if args.grad_accum > 1 else ""))

    # OUT/log.jsonl, which rank 0 alone writes: a new one, or a resumed run's cut back to step `start`
    log_file, ckpt_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "ckpt.pt")
    if resume is not None:
        if rank == 0:
            guards.trim_log(log_file, start, keep_phases=("task_pretrain",))  # the evaluation's line goes
        print0(f"resuming from {ckpt_path} at step {start}")
    log = guards.Log(log_file, "a" if resume is not None else "w", write=rank == 0)
    # NLVR2's task-specific pre-training runs before the first checkpoint, which holds its result: a
    # resumed run skips it; a run killed during it has no checkpoint of its own and starts over
    if args.task_pretrain_epochs and resume is None:
        log.write({"phase": "task_pretrain", **task_pretrain(args, task, model, ctx, rank, world)})

    def save(step, losses):  # the plain model, never the compiled one
        if rank == 0:
            images = task.images
            storage.save_checkpoint(ckpt_path, model, optimizer, scaler, step, args,
                                    task.vocab, images.class_names, head=head.state_dict(), gen=gen.get_state(),
                                    losses=losses, task=args.task, answers=getattr(task, "answers", None),
                                    tags=task.tags, extractor=images.stores[0].meta.get("extractor", {}))  # ask.py

    # the loop: steps start + 1 to `steps`; rank 0 logs and saves. The host reads the device on logging
    # and saving steps alone: the check for a non-finite loss waits for them.
    model.train(), head.train()
    task_loss = common.wrap(common.Loss(lambda items: task.loss(model, head, items), model, head), device, world,
                            args.compile)
    per_epoch = steps_per_epoch(args, task)
    t0, seen, pending = time.time(), 0, []  # pending: the steps' losses the host has not read yet
    out.saved = (ckpt_path, start) if start else None
    one = torch.ones((), device=device)  # what a step's loss is divided by: it is the global batch's mean already
    for step in range(start, steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0 or step == start:  # a new shuffle each epoch
            order = np.random.default_rng([args.seed, epoch]).permutation(len(task.train))
        items = [task.train[j] for j in order[i * args.batch_size:(i + 1) * args.batch_size]]  # the global batch
        items = task.draw(items, gen)  # its random choices, the same on every process
        mine = shard(items, rank, world)  # this process's share
        micro = [shard(mine, j, args.grad_accum) for j in range(args.grad_accum)]
        share = lambda mean, mb: (mean * (len(mb) / len(items)),) * 2  # noqa: E731  (the task's mean over mb, weighted)
        norm, part = common.train_step(task_loss, micro, share, optimizer, scaler, lr_at(step), args.clip, ctx, world)
        pending.append((step + 1, None, part, one))
        seen += len(items)
        log_now = (step + 1) % args.log_every == 0 or step + 1 == steps
        stop = ctrl_c.agreed()  # a signal from here on stops the next step
        save_now = (step + 1) % args.save_every == 0 or step + 1 == steps or stop
        if not (log_now or save_now):
            continue
        losses, pending = losses + common.read_losses(pending, scaler, out.saved), []
        if log_now:
            dt = (time.time() - t0) / len(losses)
            record = {"step": step + 1, "epoch": epoch + (i + 1) / per_epoch, "loss": float(np.mean(losses)),
                      "lr": lr_at(step), "grad_norm": norm.item()}
            log.write(record)
            print0(f"step {step + 1}/{steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
                   f"lr {record['lr']:.2e} | norm {record['grad_norm']:.2f} | {dt * 1000:.0f} ms/step | "
                   f"{seen / (time.time() - t0):.0f} samples/s | ETA {dt * (steps - step - 1) / 60:.1f} min",
                   flush=True)
            t0, seen, losses = time.time(), 0, []
        if save_now:
            save(step + 1, losses)
            out.saved = (ckpt_path, step + 1)
        if stop:
            ctrl_c.stop(f"stopped at step {step + 1}: {ckpt_path} saved; the same command with --resume goes on",
                        world)

    results = report(args, task, model, head, ctx, log, t_start, rank)
    common.end_processes(world)
    return results


if __name__ == "__main__":
    main()
