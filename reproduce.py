"""
Reproduce the paper's comparisons in miniature (Tables 1-3 and Figure 2 of U-VisualBERT) on the
toy world: every variant of docs/METHOD.md §3 pre-trained with the same budget from the same toy BERT, each
fine-tuned on the four tasks, mean +- std over seeds, and the embedding map of Figure 2.

    python reproduce.py            # every variant, four tasks, 3 seeds
    python reproduce.py --quick    # one seed, for a first look

It runs pretrain.py and finetune.py by their command lines, two at a time on a 2-core CPU (--jobs),
each in its own folder under OUT; a run whose results are already there is not run again, so an
interrupted reproduction goes on where it stopped. It writes OUT/table.md, OUT/table.json and
OUT/figure2.png, and says for each of the paper's four claims (docs/METHOD.md §10) whether the miniature
shows it.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import data
import toy
from model import Config, VisualBERT
from pretrain import load_checkpoint

# -----------------------------------------------------------------------------
# settings

# docs/METHOD.md §3: each variant's pre-training flags, and whether it sees tags. Base is the toy BERT itself.
VARIANTS = {
    "Base": None,
    "U": ["--unaligned"],
    "U_NT": ["--unaligned", "--no-tags"],
    "U_NC": ["--unaligned", "--no-captions"],
    "S": ["--aligned"],
    "S_NT": ["--aligned", "--no-tags"],
    "H": ["--hybrid"],
}
# the table's columns: (header, task, split, metric), as the paper's Tables 1-3 (docs/METHOD.md §10)
COLUMNS = [("VQA", "vqa", "val", "accuracy"),
           ("NLVR2 dev", "nlvr2", "dev", "accuracy"), ("NLVR2 test-P", "nlvr2", "test1", "accuracy"),
           ("R@1", "retrieval", "test", "R@1"), ("R@5", "retrieval", "test", "R@5"), ("R@10", "retrieval", "test", "R@10"),
           ("RefCOCO+ val", "refcoco", "val", "accuracy"), ("testA", "refcoco", "testA", "accuracy"), ("testB", "refcoco", "testB", "accuracy")]
PAPER = {  # docs/METHOD.md §10, BERT-base at Conceptual Captions scale, same columns
    "Base": [69.26, 68.40, 68.65, 42.86, 73.62, 83.28, 70.66, 77.06, 61.43],
    "U": [70.74, 71.74, 71.02, 55.37, 82.93, 89.84, 72.42, 79.11, 64.19],
    "U_NT": [69.87, 67.90, 68.92, 50.56, 80.22, 88.32, 71.94, 77.79, 62.38],
    "U_NC": [70.47, 71.47, 71.19, 54.36, 82.22, 89.24, 72.96, 79.30, 64.25],
    "S": [70.87, 73.44, 73.93, 61.19, 86.32, 91.90, 73.65, 79.48, 64.49],
    "S_NT": [70.49, 72.56, 73.53, 60.26, 85.58, 91.64, 72.70, 77.93, 62.99],
    "H": [71.05, 73.80, 74.82, 60.28, 86.30, 92.06, 74.01, 80.18, 64.89],
}
# the budgets: the toy BERT's steps, every variant's pre-training steps, each task's fine-tuning epochs
BUDGET = {"bert": 600, "pretrain": 200, "vqa": 0.25, "nlvr2": 2, "retrieval": 0.25, "refcoco": 8}
TEST_IMAGES = 50  # retrieval ranks each caption among the first 50 toy test images (of 100), for time

p = argparse.ArgumentParser(description="The paper's Tables 1-3 and Figure 2 in miniature, on the toy world.")
p.add_argument("--quick", action="store_true", help="one seed instead of three")
p.add_argument("--seeds", type=int, default=None, help="how many seeds (default 3, or 1 with --quick)")
p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="which rows")
p.add_argument("--out", default="out/reproduce", help="output folder: one folder per run, table.md, table.json, figure2.png")
p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs side by side (one thread each when several)")
p.add_argument("--toy-root", default=toy.TOY_DIR, help="where the toy world is made and cached")
p.add_argument("--budget", nargs="+", default=[], metavar="KEY=N",
               help="change a budget: " + ", ".join(f"{k}={v}" for k, v in BUDGET.items()) + " (steps; fine-tuning epochs)")

# -----------------------------------------------------------------------------
# the runs: a list of command lines with their dependencies, run side by side


class Run:
    def __init__(self, name, argv, out, done_file, after=()):
        self.name, self.argv, self.out, self.done_file, self.after = name, argv, out, done_file, list(after)

    def done(self):
        return os.path.exists(os.path.join(self.out, self.done_file))


def plan(args, budget, seeds):
    """Every run the table needs: the toy BERT, each variant's pre-training per seed, and each
    (variant, task, seed) fine-tuning, each from its variant's checkpoint."""
    O, toy_flags = args.out, ["--toy-root", args.toy_root, "--cache-dir", os.path.join(args.out, "cache")]
    bert = Run("bert", ["pretrain.py", "--text-only", "--max-steps", str(budget["bert"]), "--out", f"{O}/bert", *toy_flags],
               f"{O}/bert", "eval.json")
    runs = [bert]
    for seed in seeds:
        for v in args.variants:
            if VARIANTS[v] is None:
                pre = bert
            else:
                pre = Run(f"{v} seed {seed}", ["pretrain.py", *VARIANTS[v], "--init-from", f"{O}/bert/ckpt.pt",
                                               "--max-steps", str(budget["pretrain"]), "--seed", str(seed),
                                               "--out", f"{O}/seed{seed}/{v}/pretrain", *toy_flags],
                          f"{O}/seed{seed}/{v}/pretrain", "eval.json", [bert])
                runs.append(pre)
            for task in dict.fromkeys(c[1] for c in COLUMNS):
                runs.append(Run(f"{v} {task} seed {seed}",
                                ["finetune.py", "--task", task, "--init-from", f"{pre.out}/ckpt.pt", "--epochs", str(budget[task]),
                                 "--seed", str(seed), "--out", f"{O}/seed{seed}/{v}/{task}", "--toy-root", args.toy_root,
                                 *(["--test-images", str(TEST_IMAGES)] if task == "retrieval" else []),
                                 *(["--no-tags"] if v.endswith("_NT") else [])],
                                f"{O}/seed{seed}/{v}/{task}", "results.json", [pre]))
    return runs


def execute(runs, jobs):
    """Run every run not done yet, at most `jobs` at a time, each after the runs it needs. A run's
    output goes to OUT/.../stdout.txt; a failed run stops the reproduction with its last lines."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    todo = [r for r in runs if not r.done()]
    print(f"{len(runs)} run(s), {len(runs) - len(todo)} already done, {len(todo)} to go, {jobs} at a time")
    t0, finished = time.time(), 0

    def one(run):
        for dep in run.after:  # dependencies come earlier in the plan, so they were submitted first
            while not dep.done():
                if getattr(dep, "failed", False):
                    raise SystemExit(f"{run.name}: needs {dep.name}, which failed")
                time.sleep(0.5)
        os.makedirs(run.out, exist_ok=True)
        with open(os.path.join(run.out, "stdout.txt"), "w") as f:
            rc = subprocess.run([sys.executable, *run.argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=os.path.dirname(os.path.abspath(__file__))).returncode
        if rc != 0 or not run.done():
            run.failed = True
            with open(os.path.join(run.out, "stdout.txt")) as f:
                tail = "".join(f.readlines()[-5:])
            raise SystemExit(f"{run.name} failed (exit {rc}): python {' '.join(run.argv)}\n{tail}")
        return run

    with ThreadPoolExecutor(jobs) as pool:
        for fut in [pool.submit(one, r) for r in todo]:
            run = fut.result()
            finished += 1
            print(f"[{finished}/{len(todo)}] {run.name} done, {(time.time() - t0) / 60:.1f} min", flush=True)

# -----------------------------------------------------------------------------
# the table and the paper's claims


def collect(out, variants, seeds):
    """{variant: (seeds, columns) array of percentages} from every run's results.json."""
    table = {}
    for v in variants:
        rows = []
        for seed in seeds:
            res = {}
            for task in dict.fromkeys(c[1] for c in COLUMNS):
                with open(os.path.join(out, f"seed{seed}", v, task, "results.json")) as f:
                    res[task] = json.load(f)
            rows.append([100 * res[task][split][metric] for _, task, split, metric in COLUMNS])
        table[v] = np.array(rows)
    return table


def spread(runs):
    """Each column's sample standard deviation over the seeds (rows); 0 with one seed."""
    return runs.std(0, ddof=1) if len(runs) > 1 else np.zeros(runs.shape[1])


def markdown(table):
    """The table as the paper lays it out, mean +- std over seeds, the paper's number beside each."""
    n = len(next(iter(table.values())))
    head = "| model | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [f"Toy world, mean ± std over {n} seed{'s' * (n > 1)} (the paper's BERT-base number in brackets).", "",
             head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for v, runs in table.items():
        cells = [f"{m:.1f} ± {s:.1f} ({pp:.1f})" if n > 1 else f"{m:.1f} ({pp:.1f})"
                 for m, s, pp in zip(runs.mean(0), spread(runs), PAPER[v])]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims(table):
    """The paper's four claims (docs/METHOD.md §10), each checked on the means: (claim, shown?, the figures).
    "Close" means within twice the seeds' standard deviation, and at least within 1 point."""
    mean = {v: t.mean(0) for v, t in table.items()}
    noise = max(1.0, 2 * float(np.mean([spread(t).mean() for t in table.values()])))
    retrieval = np.array([c[1] == "retrieval" for c in COLUMNS])
    out = []
    if {"U", "Base"} <= set(mean):
        wins = int((mean["U"] > mean["Base"]).sum())
        out.append(("U beats Base everywhere", bool(wins == len(COLUMNS)), f"U is higher on {wins} of {len(COLUMNS)} columns, "
                    f"by {np.mean(mean['U'] - mean['Base']):+.1f} points on average"))
    if {"U", "S"} <= set(mean):
        gap, gap_r = np.mean(mean["S"][~retrieval] - mean["U"][~retrieval]), np.mean(mean["S"][retrieval] - mean["U"][retrieval])
        out.append(("U comes close to S except on retrieval", bool(abs(gap) <= noise and gap_r > noise),
                    f"S - U: {gap:+.1f} points outside retrieval, {gap_r:+.1f} on retrieval (close: within {noise:.1f})"))
    if {"U", "U_NT", "S", "S_NT"} <= set(mean):
        du, ds = np.mean(mean["U"] - mean["U_NT"]), np.mean(mean["S"] - mean["S_NT"])
        out.append(("tags matter more without aligned data", bool(du > ds), f"U - U_NT {du:+.1f}, S - S_NT {ds:+.1f} points on average"))
    if {"U", "U_NC"} <= set(mean):
        d = np.mean(mean["U_NC"] - mean["U"])
        out.append(("U_NC (no captions) stays close to U", bool(abs(d) <= noise), f"U_NC - U: {d:+.1f} points on average (close: within {noise:.1f})"))
    return out

# -----------------------------------------------------------------------------
# Figure 2: last-layer representations of words, tags and regions, projected to 2-D


def pca(x, k=2):
    """The first k principal components of the rows of x (N, D) -> (N, k)."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def tsne(x, perplexity=20.0, steps=600, seed=0):
    """t-SNE (van der Maaten and Hinton, 2008) of the rows of x (N, D) -> (N, 2): Gaussian neighbour
    probabilities at the given perplexity, Student-t ones in 2-D, KL descent with momentum and
    early exaggeration, started from the PCA map."""
    x = pca(x.double(), min(30, *x.shape))
    n = len(x)
    d2 = torch.cdist(x, x).pow(2)  # (N, N)
    lo, hi, beta = torch.zeros(n, 1, dtype=x.dtype), torch.full((n, 1), math.inf, dtype=x.dtype), torch.ones(n, 1, dtype=x.dtype) / d2.mean()
    for _ in range(64):  # bisect each point's precision to reach the perplexity
        p = torch.exp(-d2 * beta).fill_diagonal_(0)
        p = p / p.sum(1, keepdim=True).clamp(min=1e-300)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1, keepdim=True)
        high = entropy > math.log(perplexity)  # too flat: raise the precision
        lo, hi = torch.where(high, beta, lo), torch.where(high, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = (p + p.T) / (2 * n)
    y = pca(x) / pca(x)[:, 0].std() * 1e-2
    y.requires_grad_(True)
    opt = torch.optim.SGD([y], lr=max(n / 12 / 4, 50), momentum=0.8)
    for step in range(steps):
        w = (1 / (1 + torch.cdist(y, y).pow(2))).fill_diagonal_(0)  # (N, N) Student-t kernel; q = w / sum(w)
        target = p * 12 if step < steps // 4 else p  # early exaggeration strengthens the attraction only
        loss = -(target * torch.log(w.clamp(min=1e-12))).sum() + torch.log(w.sum())  # KL(p || q) up to a constant
        opt.zero_grad()
        loss.backward()
        opt.step()
    return y.detach().float()


@torch.no_grad()
def representations(ckpt_path, root, images, scenes, classes, per_class=30, tags=True):
    """Last-layer states of words (class words in held-out captions), tags (each region's tag piece)
    and regions (held-out images), for the given classes -> (N, H) states, class index, modality."""
    ckpt = load_checkpoint(ckpt_path)
    model = VisualBERT(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    vocab = data.Vocab(ckpt["vocab"], source=ckpt_path)
    states, cls, modality, taken = [], [], [], Counter()  # taken: (class, modality) -> points kept

    def keep(h, c, m):
        if c in classes and taken[c, m] < per_class:
            taken[c, m] += 1
            states.append(h), cls.append(classes.index(c)), modality.append(m)

    # words: the first piece of each class word in held-out captions
    first_piece = {c: vocab.encode_batch([c])[0][0] for c in classes}
    with open(os.path.join(root, "heldout", "captions.txt")) as f:
        captions = [line.strip() for line in f if line.strip()][:400]
    b = data.text_inputs(vocab.encode_batch(captions), vocab, 32)
    h, _ = model(**b)
    for i, row in enumerate(b["input_ids"].tolist()):
        words = captions[i].split()
        for t, piece in enumerate(row):
            for c in classes:
                if piece == first_piece[c] and c in words:
                    keep(h[i, t], c, "word")
    # tags and regions: each region coloured by its true class (the scene's object), tags by theirs
    ids = sorted(images.where)[:300]
    b = data.image_inputs([images[i] for i in ids], vocab.tag_pieces(images.class_names), tags)
    inputs = {k: b[k] for k in ("tag_ids", "tag_boxes", "tag_mask", "feats", "boxes", "region_mask") if k in b}
    h, spans = model(**inputs)
    for i, image in enumerate(ids):
        truth = [o["class"] for o in scenes[image]["objects"]]
        if tags:
            seen = set()
            for t, k in enumerate(b["tag_region"][i].tolist()):
                if k >= 0 and k not in seen:  # the region's first tag piece
                    seen.add(k)
                    keep(h[i, spans["tags"]][t], images.class_names[int(b["obj_labels"][i, k])], "tag")
        for k in range(int(b["region_mask"][i].sum())):
            keep(h[i, spans["regions"]][k], truth[k], "region")
    return torch.stack(states).float(), np.array(cls), np.array(modality)


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 190, 190), (240, 50, 230), (128, 128, 0)]
PANEL, LEGEND = 400, 70  # pixels: each square panel, the legend strip below


def draw_figure(panels, classes, path):
    """panels: [(title, points (N, 2), class index (N,), modality (N,))] -> a PNG with one square
    panel each, side by side: colour by class, marker by modality (word o, tag square, region ^)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (PANEL * len(panels), PANEL + LEGEND), "white")
    d = ImageDraw.Draw(img)

    def marker(x, y, modality, colour, r=4):
        if modality == "word":
            d.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
        elif modality == "tag":
            d.rectangle([x - r, y - r, x + r, y + r], fill=colour)
        else:
            d.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)

    for j, (title, xy, cls, modality) in enumerate(panels):
        x0, pad = j * PANEL, 30
        d.rectangle([x0 + 2, 2, x0 + PANEL - 3, PANEL - 3], outline=(160, 160, 160))
        d.text((x0 + 10, 8), title, fill="black")
        xy = np.asarray(xy, dtype=np.float64)
        span = np.maximum(xy.max(0) - xy.min(0), 1e-9)
        pos = (xy - xy.min(0)) / span * (PANEL - 2 * pad) + pad  # (N, 2) in pixels
        for (x, y), c, m in zip(pos, cls, modality):
            marker(x0 + x, y, m, PALETTE[c % len(PALETTE)])
    y = PANEL + 12
    for k, c in enumerate(classes):
        x = 10 + k * 95
        d.rectangle([x, y, x + 10, y + 10], fill=PALETTE[k % len(PALETTE)])
        d.text((x + 15, y), c, fill="black")
    for k, m in enumerate(("word", "tag", "region")):
        marker(16 + k * 95, y + 35, m, (90, 90, 90))
        d.text((31 + k * 95, y + 30), m, fill="black")
    img.save(path)
    return img.size


def figure2(args, seed):
    """Figure 2: one panel each for S, U and U_NT (seed `seed`'s pre-training)."""
    root = args.toy_root
    scenes = data.read_json(os.path.join(root, "scenes.json"))
    images = data.Images([os.path.join(root, "features", "heldout")])
    counts = {}
    for i in images.where:
        for o in scenes[i]["objects"]:
            if not o.get("background"):
                counts[o["class"]] = counts.get(o["class"], 0) + 1
    classes = sorted(counts, key=lambda c: (-counts[c], c))[:6]  # the most frequent classes
    panels = []
    for v in ("S", "U", "U_NT"):
        ckpt = os.path.join(args.out, f"seed{seed}", v, "pretrain", "ckpt.pt")
        if not os.path.exists(ckpt):
            continue
        h, cls, modality = representations(ckpt, root, images, scenes, classes, tags=not v.endswith("_NT"))
        panels.append((f"{v} (t-SNE of last-layer states)", tsne(h).numpy(), cls, modality))
    if panels:
        return draw_figure(panels, classes, os.path.join(args.out, "figure2.png"))


def main(argv=None):
    args = p.parse_args(argv)
    budget = dict(BUDGET)
    for kv in args.budget:
        k, _, v = kv.partition("=")
        if k not in budget:
            p.error(f"--budget {kv}: the budgets are {', '.join(budget)}")
        epochs = k in ("vqa", "nlvr2", "retrieval", "refcoco")  # fine-tuning epochs; the rest are steps
        try:
            budget[k] = float(v) if epochs else int(v)
        except ValueError:
            p.error(f"--budget {kv}: {v!r} is not a {'number' if epochs else 'whole number'}")
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    data.check_paths(args, {"out": "out", "toy_root": "out"})
    t0 = time.time()
    toy.make_toy_world(args.toy_root)
    os.makedirs(args.out, exist_ok=True)
    print(f"variants {', '.join(args.variants)}; seeds {seeds}; budget " + ", ".join(f"{k} {v}" for k, v in budget.items()))
    runs = plan(args, budget, seeds)
    execute(runs[:1], 1)  # the toy BERT, alone with every core: everything else starts from it
    execute(runs[1:], args.jobs)

    table = collect(args.out, args.variants, seeds)
    md = markdown(table)
    verdicts = claims(table)
    md += "\nThe paper's claims (docs/METHOD.md §10):\n\n" + "\n".join(f"- {c}: {'yes' if ok else 'no'} ({why})" for c, ok, why in verdicts) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    data.write_json(os.path.join(args.out, "table.json"), {
        "columns": [c[0] for c in COLUMNS], "seeds": seeds, "budget": budget,
        "runs": {v: t.round(2).tolist() for v, t in table.items()},
        "mean": {v: t.mean(0).round(2).tolist() for v, t in table.items()},
        "std": {v: spread(t).round(2).tolist() for v, t in table.items()},
        "paper": {v: PAPER[v] for v in table}, "claims": [{"claim": c, "shown": ok, "figures": why} for c, ok, why in verdicts]})
    print("\n" + md)
    size = figure2(args, seeds[0])
    if size:
        print(f"figure 2: {os.path.join(args.out, 'figure2.png')} ({size[0]}x{size[1]})")
    print(f"table: {os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'table.json')}; {(time.time() - t0) / 60:.1f} min in all")
    return table


if __name__ == "__main__":
    main()
