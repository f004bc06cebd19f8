"""
Reproduce the paper's comparisons in miniature (Tables 1-3 and Figure 2 of U-VisualBERT) on the toy
world, with a protocol that can show what pre-training buys if it buys anything:

- the toy BERT (text only), then every variant of docs/METHOD.md §3 from it, each pre-trained once for
  the same steps (BUDGET); the report gives its held-out losses and the grounding probe at each quarter
  of its steps, whether the losses still fell (CONVERGED, not a gate) and whether it saw at least as
  many sequences as the largest fine-tuning run from it;
- every task fine-tuned from every variant on nested fractions of its training set (by default 1/16
  and all: finetune.py --train-fraction), each fraction for the same number of steps, with several
  seeds, at budgets chosen on Base alone so that every task it can learn has left its trivial baseline
  (docs/METHOD.md section 13); each metric also over the items whose classes are rare in the training
  set and over the common ones;
- a 95% confidence interval over the fine-tuning seeds on every number, and the paper's claims
  checked with the intervals;
- a grounding probe, with no fine-tuning: does the model name a region's class from the region
  alone, and do region states sit near the states of their class words (probe below);
- Figure 2: t-SNE of the states of words, tags and regions.

    python reproduce.py                     # every variant, 3 seeds
    python reproduce.py --quick             # Base and U, 1 seed, 1/16 of VQA, retrieval, RefCOCO+: a first look
    python reproduce.py --variants U U_NT   # Base, U and U_NT, 3 seeds: U against Base and U_NT, with intervals

It runs pretrain.py and finetune.py by their command lines (each script's main(argv) in a worker
process), one per core as memory allows (--jobs), each in its own folder under OUT; a run whose results
are already there is not run again, so an interrupted reproduction goes on where it stopped and --quick
followed by the full command only adds variants and seeds. OUT can go to another machine between
commands; copied without its checkpoints (*.pt), the pre-trainings are run again, and must give the
weights their fine-tuning runs started from (weights.json), for which every process adds with the same
kernels on any x86 CPU with AVX2 (below). It writes OUT/table.md, OUT/table.json,
OUT/curves.png and, with S, U or U_NT among the rows, OUT/figure2.png.
"""

import os

# every process of a reproduction adds with the AVX2 kernels of torch, MKL and oneDNN, on a Linux x86 CPU that has
# them: left to choose, one with AVX-512 (a Zen 4, a recent Xeon) takes wider kernels, which add in another order,
# and its pre-trainings give other weights than weights.json made on a CPU without (docs/LOG.md 22 A, 23). Set
# before torch loads, for this process and the workers it starts; a value set already is kept
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def has_avx2():
    """Whether this is a Linux x86 CPU with AVX2 (the flags of /proc/cpuinfo say so)."""
    if not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as cpu:
        return any(line.startswith("flags") and "avx2" in line.split() for line in cpu)


if __name__ == "__main__" and has_avx2():
    for name, value in AVX2.items():
        os.environ.setdefault(name, value)

import hashlib
import itertools
import json
import math
import signal
import sys
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import torch

import analysis
import data
import finetune
import guards
import pretrain
import storage
import toy
from model import PRESETS, Config, VisualBERT
from storage import load_checkpoint, load_weights

# -----------------------------------------------------------------------------
# settings


def variant_flags(v, root):
    """Each variant's pre-training flags (docs/METHOD.md §3); None for Base, the toy BERT itself.
    U_SBU is U with the toy world's second caption corpus (toy.py: captions of other photos, in
    other words), given with every data flag, as real data is."""
    sbu = ["--images", f"{root}/features/pretrain", "--captions", f"{root}/pretrain/captions_sbu.txt",
           "--text", f"{root}/pretrain/text.txt", "--heldout-images", f"{root}/features/heldout",
           "--heldout-captions", f"{root}/heldout/captions.txt", "--heldout-text", f"{root}/heldout/text.txt"]
    return {"Base": None, "U": ["--unaligned"], "U_NT": ["--unaligned", "--no-tags"],
            "U_NC": ["--unaligned", "--no-captions"],
            "U_SBU": ["--unaligned", *sbu], "S": ["--aligned"], "S_NT": ["--aligned", "--no-tags"],
            "H": ["--hybrid"]}[v]


VARIANTS = ["Base", "U", "U_NT", "U_NC", "U_SBU", "S", "S_NT", "H"]
QUICK = ["Base", "U"]  # --quick: does pre-training without pairs buy anything over the toy BERT, on 1/16 of each task
# the table's columns: (header, task, split, metric), as the paper's Tables 1-3 (docs/METHOD.md §10)
COLUMNS = [("VQA", "vqa", "val", "accuracy"),
           ("NLVR2 dev", "nlvr2", "dev", "accuracy"), ("NLVR2 test-P", "nlvr2", "test1", "accuracy"),
           ("R@1", "retrieval", "test", "R@1"), ("R@5", "retrieval", "test", "R@5"),
           ("R@10", "retrieval", "test", "R@10"),
           ("RefCOCO+ val", "refcoco", "val", "accuracy"), ("testA", "refcoco", "testA", "accuracy"),
           ("testB", "refcoco", "testB", "accuracy")]
TASKS = list(dict.fromkeys(c[1] for c in COLUMNS))
# --quick leaves NLVR2 out: 3/5 of the fine-tuning time, and on 1/16 Base hardly leaves its baseline (docs/LOG.md 19)
QUICK_TASKS = ["vqa", "retrieval", "refcoco"]
PAPER = {  # BERT-base at Conceptual Captions scale, same columns; the project has no U_SBU figures of the paper
    "Base": [69.26, 68.40, 68.65, 42.86, 73.62, 83.28, 70.66, 77.06, 61.43],
    "U": [70.74, 71.74, 71.02, 55.37, 82.93, 89.84, 72.42, 79.11, 64.19],
    "U_NT": [69.87, 67.90, 68.92, 50.56, 80.22, 88.32, 71.94, 77.79, 62.38],
    "U_NC": [70.47, 71.47, 71.19, 54.36, 82.22, 89.24, 72.96, 79.30, 64.25],
    "U_SBU": None,
    "S": [70.87, 73.44, 73.93, 61.19, 86.32, 91.90, 73.65, 79.48, 64.49],
    "S_NT": [70.49, 72.56, 73.53, 60.26, 85.58, 91.64, 72.70, 77.93, 62.99],
    "H": [71.05, 73.80, 74.82, 60.28, 86.30, 92.06, 74.01, 80.18, 64.89],
}
# the budgets: the toy BERT's steps, every variant's pre-training steps, and each task's fine-tuning
# epochs on its whole training set, each the smallest of a grid at which Base is 10 points above the task's
# trivial baseline, chosen on Base alone before any variant was fine-tuned (docs/METHOD.md sections 13 and 14;
# NLVR2's 1.25 keeps its steps on a training set four times larger, section 18); a fraction F of the set gets
# epochs / F, the same number of steps
BUDGET = {"bert": 2400, "pretrain": 4000, "vqa": 1.6, "nlvr2": 1.25, "retrieval": 1.0, "refcoco": 2.0}
FRACTIONS = ["1/16", "1"]
TEST_IMAGES = 50  # retrieval ranks each caption among the first 50 toy test images (of 100), for time
# a pre-training run has converged when every held-out loss fell over the last quarter of the steps by
# less than 5% of its final value (or by less than 0.01, the evaluation's noise), and a variant with
# the match loss gets at least 70% of held-out pairs right (chance: 50%). A plateau passes this test
# (docs/LOG.md, section 8)
CONVERGED = {"last_quarter": 0.05, "noise": 0.01, "match_acc": 0.70}
# the toy BERT runs alone, on this many threads on any machine: the number of threads changes the order of
# torch's sums and so the weights, and a folder carried to another machine must get the same ones again
# (weights.json); every other run has one thread
BERT_THREADS = 2

parser = guards.ArgumentParser(
    description="The paper's Tables 1-3 and Figure 2 in miniature, on the toy world.")
parser.add_argument("--quick", action="store_true",
                    help="one seed, the variants " + ", ".join(QUICK) + ", the tasks " + ", ".join(QUICK_TASKS)
                    + " and 1/16 of each training set, for a first look")
parser.add_argument("--seeds", type=guards.POSITIVE_INT, default=None,
                    help="how many fine-tuning seeds (default 3, or 1 with --quick)")
parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                    help="which rows (default: all, or those of --quick; Base always)")
parser.add_argument("--tasks", nargs="+", choices=TASKS,
                    help="which tasks (default: all, or those of --quick)")
parser.add_argument("--fractions", nargs="+",
                    help="fractions of each task's training set, e.g. 1/16 1/4 1 (default 1/16 1, or 1/16 with --quick)")
parser.add_argument("--out", default="out/reproduce",
                    help="output folder: one folder per run, table.md, table.json, curves.png, figure2.png")
parser.add_argument("--jobs", type=guards.POSITIVE_INT,
                    help="runs side by side, one thread each (default: one per core, as many as the free memory "
                         "holds at 1.5 GB a run; the toy BERT runs first, alone, on " + str(BERT_THREADS) + " threads)")
parser.add_argument("--toy-root", default=toy.TOY_DIR, help="where the toy world is made and cached")
parser.add_argument("--budget", nargs="+", default=[], metavar="KEY=N",
                    help="change a budget: " + ", ".join(f"{k}={v}" for k, v in BUDGET.items())
                    + " (steps; fine-tuning epochs)")
parser.add_argument("--device", default="cpu", help="where every run trains (cpu, cuda)")
parser.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                    help="size preset of the toy BERT, and so of every variant (small: for a GPU)")


# -----------------------------------------------------------------------------
# the runs: a list of command lines with their dependencies, run side by side


class Run:
    def __init__(self, name, argv, out, done_files, after=()):
        self.name, self.argv, self.out, self.after = name, argv, out, list(after)
        self.done_files = list(done_files)

    def done(self):
        return all(os.path.exists(os.path.join(self.out, f)) for f in self.done_files)


def label(fraction):
    return "f" + fraction.replace("/", "-")  # a folder name: f1-16, f1-4, f1


def finetuned(out, variant, task, fraction, seed):
    """The folder of one fine-tuning run."""
    return f"{out}/finetune/{variant}/{task}/{label(fraction)}/seed{seed}"


def plan(args, budget, seeds):
    """Every run the table needs: the toy BERT, each variant's pre-training (once), and each
    (variant, task, fraction, seed) fine-tuning from its variant's checkpoint."""
    O, root = args.out, args.toy_root

    def pretraining(name, v, flags, steps, after=()):
        argv = ["pretrain.py", *flags, "--max-steps", str(steps), "--eval-every", str(max(1, steps // 4)),
                "--toy-root", root, "--out", f"{O}/pretrain/{v}", "--cache-dir", os.path.join(O, "cache"),
                "--device", args.device]
        # done with its checkpoint: one copied without it (the small files alone) is run again, for its
        # fine-tuning runs still to go and for the probe
        return Run(name, argv, f"{O}/pretrain/{v}", ["eval.json", "ckpt.pt"], after)

    pre = {"Base": pretraining("Base (the toy BERT)", "Base", ["--text-only", "--model", args.model], budget["bert"])}
    for v in args.variants:
        if v != "Base":
            flags = [*variant_flags(v, root), "--init-from", f"{O}/pretrain/Base/ckpt.pt", "--keep-checkpoints"]
            pre[v] = pretraining(f"{v} pre-training", v, flags, budget["pretrain"], [pre["Base"]])
    runs = list(pre.values())
    for seed, fraction, v, task in itertools.product(seeds, fractions(args), args.variants, chosen_tasks(args)):
        out = finetuned(O, v, task, fraction, seed)
        argv = ["finetune.py", "--task", task, "--init-from", f"{pre[v].out}/ckpt.pt",
                "--train-fraction", repr(float(Fraction(fraction))),
                "--epochs", repr(float(budget[task] / Fraction(fraction))), "--seed", str(seed),
                "--out", out, "--toy-root", root, "--device", args.device]
        argv += ["--test-images", str(TEST_IMAGES)] if task == "retrieval" else []
        argv += ["--no-tags"] if v.endswith("_NT") else []
        runs.append(Run(f"{v} {task} {fraction} seed {seed}", argv, out, ["results.json"], [pre[v]]))
    return runs


def between_runs():
    """A worker ignores Ctrl-C and SIGTERM but in a run, where the script takes them at a step's end: a
    worker killed between runs would break the pool, and the runs in the others with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def work(argv, out, threads):
    """One run in this worker process: the script's main(argv), its output into OUT/stdout.txt ->
    (exit code, wall seconds, CPU seconds). Workers live through many runs, so Python and torch
    start once per worker, not once per run (about 2 s of CPU each)."""
    import contextlib
    import traceback
    torch.set_num_threads(threads)
    main = {"pretrain.py": pretrain.main, "finetune.py": finetune.main}[argv[0]]
    t, cpu = time.time(), time.process_time()
    log = open(os.path.join(out, "stdout.txt"), "w")
    with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        sys.argv, rc = list(argv), 0
        try:
            main(argv[1:])
        except SystemExit as e:  # the scripts stop on bad input with SystemExit and a message
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code)
        except Exception:
            traceback.print_exc()
            rc = 1
    return rc, time.time() - t, time.process_time() - cpu


def again(out):
    """How a run that is not done goes on in its folder: from its checkpoint (--resume), or replacing
    what a run killed before its first checkpoint left (--overwrite); nothing for a new folder."""
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        return ["--resume"]
    return ["--overwrite"] if any(os.path.exists(os.path.join(out, f)) for f in guards.RUN_FILES) else []


def same_weights(run):
    """A pre-training's weights against the fingerprint kept beside them (weights.json, written the first
    time): the fine-tuning runs from it started from those weights. A pre-training run again, in a folder
    copied without its checkpoints, must give the same ones (it does on the same kind of CPU), or the
    runs done from the first would be mixed with runs from the second: that stops the reproduction."""
    state = load_checkpoint(os.path.join(run.out, "ckpt.pt"))["model"]
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    path = os.path.join(run.out, "weights.json")
    if not os.path.exists(path):
        storage.write_json(path, {"sha256": h.hexdigest()})
    elif storage.read_json(path)["sha256"] != h.hexdigest():
        variant = os.path.basename(run.out)
        raise SystemExit(f"{run.out}/ckpt.pt: the pre-training, run again, gave other weights than the ones its "
                         f"fine-tuning runs started from ({path}); remove its fine-tuning folders (finetune/{variant} "
                         f"in the output folder) and {path} to fine-tune from the new weights")


def same_world(out):
    """A folder's runs read one version of the toy world (world.json, written the first time). Runs made on
    another version would be taken as done on files that have changed since: that stops the reproduction."""
    path = os.path.join(out, "world.json")
    if os.path.exists(path):
        made_on = storage.read_json(path)["toy_version"]
        if made_on != toy.VERSION:
            raise SystemExit(f"{path}: its runs read toy world v{made_on}, this is v{toy.VERSION}; start another "
                             f"--out folder, or keep only the runs whose files did not change and set the version")
    elif any(os.path.isdir(os.path.join(out, d)) for d in ("pretrain", "finetune")):
        raise SystemExit(f"{out}: it holds runs but no world.json, so which toy world they read is unknown; start "
                         f"another --out folder, or write {{\"toy_version\": {toy.VERSION}}} into {path} if they read "
                         f"v{toy.VERSION}")
    else:
        storage.write_json(path, {"toy_version": toy.VERSION})


PLACES = ("--out", "--init-from", "--cache-dir", "--toy-root")  # flags naming where a run reads and writes


def settings(argv):
    """A run's command line without the places it reads and writes (a folder copied to another place or
    machine keeps its runs): what a done run and the plan must agree on."""
    places = {i + 1 for i, a in enumerate(argv) if a in PLACES}
    return [os.path.basename(a) if "/" in a else a for i, a in enumerate(argv)
            if i not in places and a not in (*PLACES, "--resume", "--overwrite")]


def same_settings(run):
    """A run done with other settings than the plan gives it (a budget changed since) would go into the
    table as the plan's: that stops the reproduction, naming the folder."""
    done = storage.read_json(os.path.join(run.out, "args.json"))["argv"]
    if settings(done) != settings(run.argv):
        raise SystemExit(f"{run.out}: done as `{' '.join(settings(done))}`, which this reproduction runs as "
                         f"`{' '.join(settings(run.argv))}`; remove the folder to run it again with these settings")


RUN_MEMORY = 1.5 * 2**30  # bytes: a run's peak is 0.96 to 1.07 GB on the toy world (docs/LOG.md 14), with room


def default_jobs():
    """--jobs by default: a run per core, as many as the memory free now holds at RUN_MEMORY each."""
    try:
        with open("/proc/meminfo") as f:  # Linux: what can be had without swapping
            free = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # elsewhere: all of it
    return max(1, min(os.cpu_count() or 1, int(free // RUN_MEMORY)))


def execute(runs, jobs, ctrl_c, threads=1):
    """Run every run not done yet in `jobs` worker processes of `threads` threads each, each run
    after the runs it needs. A run's output goes to OUT/.../stdout.txt, its times to time.json; a
    failed run stops the reproduction with its last lines. A Ctrl-C or SIGTERM (ctrl_c.asked) starts
    no new run and stops the running ones at their next step's end, saved (each takes the signal as
    the scripts do); the same command then goes on from there."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    todo = [r for r in runs if not r.done()]
    print(f"{len(runs)} run(s), {len(runs) - len(todo)} already done, {len(todo)} to go, {jobs} at a time")
    if not todo:
        return
    t0, finished, running = time.time(), 0, {}
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch as the spawned workers import it
    told = False  # whether the workers were passed the signal
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=between_runs) as pool:
        while (todo and not ctrl_c.asked) or running:
            for run in [r for r in todo if all(d.done() for d in r.after)][: jobs - len(running)]:
                if ctrl_c.asked:
                    break
                todo.remove(run)
                os.makedirs(run.out, exist_ok=True)
                running[pool.submit(work, run.argv + again(run.out), run.out, threads)] = run
            if not running:
                if ctrl_c.asked:
                    break
                raise SystemExit(f"{todo[0].name}: a run it needs is not done")
            done, _ = wait(running, timeout=1, return_when=FIRST_COMPLETED)
            if ctrl_c.asked and not told:  # a Ctrl-C reached them already; a SIGTERM to this process did not
                for p in pool._processes.values():  # the pool's own list of its worker processes
                    os.kill(p.pid, signal.SIGTERM)
                told = True
            for fut in done:
                run = running.pop(fut)
                rc, wall, cpu = fut.result()
                if ctrl_c.asked and rc in (130, 143):  # stopped at a step's end, its checkpoint saved
                    continue
                if rc != 0 or not run.done():
                    with open(os.path.join(run.out, "stdout.txt")) as f:
                        tail = "".join(f.readlines()[-5:])
                    raise SystemExit(f"{run.name} failed (exit {rc}): python {' '.join(run.argv)}\n{tail}")
                if run.argv[0] == "pretrain.py":  # before any fine-tuning starts from it
                    same_weights(run)
                times = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
                storage.write_json(os.path.join(run.out, "time.json"), times)
                finished += 1
                print(f"[{finished}/{finished + len(todo) + len(running)}] {run.name} done, "
                      f"{(time.time() - t0) / 60:.1f} min", flush=True)

# -----------------------------------------------------------------------------
# the table, its intervals (analysis.py) and the paper's claims

def columns(tasks):
    """The table's columns of these tasks."""
    return [c for c in COLUMNS if c[1] in tasks]


def collect(out, variants, fractions, seeds, tasks=TASKS):
    """{variant: {fraction: (seeds, columns) array of percentages}} from every run's results.json."""

    def seed_row(v, fraction, seed):
        res = {task: storage.read_json(f"{finetuned(out, v, task, fraction, seed)}/results.json") for task in tasks}
        return [100 * res[task][split][metric] for _, task, split, metric in columns(tasks)]

    return {v: {f: np.array([seed_row(v, f, seed) for seed in seeds]) for f in fractions} for v in variants}


# rare and common items (docs/METHOD.md section 13): one column per task, its first table column
RARE_COLUMNS = [c for k, c in enumerate(COLUMNS) if k == 0 or c[1] != COLUMNS[k - 1][1]]


def rare_columns(tasks):
    return [c for c in RARE_COLUMNS if c[1] in tasks]


def collect_by_class(out, variants, fractions, seeds, tasks=TASKS):
    """{variant: {fraction: {"rare" | "common": (seeds, rare columns) array of percentages}}} from every
    run's results.json, with "items": the number of rare and common items of each column (seed 0)."""

    def by_class(v, fraction, seed):
        res = {task: storage.read_json(f"{finetuned(out, v, task, fraction, seed)}/results.json")["by_class"]
               for task in tasks}
        return {g: [100 * (res[t][split][g][m] if res[t][split][g]["items"] else np.nan) for _, t, split, m in
                    rare_columns(tasks)] for g in ("rare", "common")}, \
            {g: [res[t][split][g]["items"] for _, t, split, _ in rare_columns(tasks)] for g in ("rare", "common")}

    table = {}
    for v, f in itertools.product(variants, fractions):
        rows = [by_class(v, f, seed) for seed in seeds]
        table.setdefault(v, {})[f] = {**{g: np.array([r[0][g] for r in rows]) for g in ("rare", "common")},
                                      "items": rows[0][1]}
    return table


def baseline_row(out, fraction, split_by=None, tasks=TASKS):
    """The trivial baselines (finetune.py's baseline.json of Base's seed-0 runs; they depend on the
    fraction trained on, not on the model) as a (1, columns) array of percentages; split_by "rare" or
    "common": over those items, in the rare columns."""
    res = {t: storage.read_json(f"{finetuned(out, 'Base', t, fraction, 0)}/baseline.json") for t in tasks}
    if split_by is None:
        return np.array([[100 * res[t][split][m] for _, t, split, m in columns(tasks)]])
    return np.array([[100 * (res[t]["by_class"][split][split_by][m] if res[t]["by_class"][split][split_by]["items"]
                             else np.nan) for _, t, split, m in rare_columns(tasks)]])


def by_class_report(rare, fractions, tasks=TASKS):
    """collect_by_class's table for table.json: each variant's (mean, low, high) per column over its rare
    and common items, and their numbers."""
    report = {"columns": [c[0] for c in rare_columns(tasks)], "rare_below": analysis.RARE}
    for v, r in rare.items():
        report[v] = {f: {**{g: [a.round(2).tolist() for a in analysis.interval(r[f][g])] for g in ("rare", "common")},
                         "items": r[f]["items"]} for f in fractions}
    return report


def base_learns(table, out, fraction, tasks=TASKS):
    """Base against each task's trivial baseline at `fraction` (docs/METHOD.md section 13): the mean of
    the task's columns minus the baseline's, per seed -> {task: (mean, low, high)}."""
    gap = table["Base"][fraction] - baseline_row(out, fraction, tasks=tasks)  # (seeds, columns)
    cols = columns(tasks)
    return {t: analysis.seed_interval(gap[:, [k for k, c in enumerate(cols) if c[1] == t]].mean(1)) for t in tasks}


def cells(x):
    """Each column of x (seeds, columns) as "mean [low, high]", or the mean alone with one seed."""
    m, lo, hi = analysis.interval(x)
    return [f"{a:.1f}" + ("" if np.isnan(b) else f" [{b:.1f}, {c:.1f}]") for a, b, c in zip(m, lo, hi)]


def table_lines(header, rows):
    """A markdown table with a "model" column first: its header, then a line per (model, cells)."""
    return ["| model | " + " | ".join(header) + " |", "|" + " --- |" * (len(header) + 1),
            *(f"| {name} | " + " | ".join(row) + " |" for name, row in rows)]


def markdown(table, fractions, out=None, rare=None, tasks=TASKS):
    """One table per fraction as the paper lays it out: mean [95% interval] over seeds, and the trivial
    baselines; then each task's first column over its rare and common items; then the paper's numbers
    (at its full data)."""
    n = len(next(iter(table.values()))[fractions[0]])
    header, rare_cols = [c[0] for c in columns(tasks)], rare_columns(tasks)
    lines = [f"Toy world, mean [95% t-interval] over {n} fine-tuning seed{'s' * (n > 1)}, in %.", ""]
    for fraction in fractions:
        which = "the whole" if Fraction(fraction) == 1 else fraction + " of each"
        base = [("trivial baseline", cells(baseline_row(out, fraction, tasks=tasks)))] if out else []
        lines += [f"Fine-tuned on {which} training set:", "",
                  *table_lines(header, [(v, cells(runs[fraction])) for v, runs in table.items()] + base), ""]
    for fraction in fractions if rare else []:
        items = next(iter(rare.values()))[fraction]["items"]
        head = [f"{c[0]} {g} ({items[g][k]})" for k, c in enumerate(rare_cols) for g in ("rare", "common")]
        pair = lambda r: [x for k in range(len(rare_cols)) for x in (cells(r["rare"])[k], cells(r["common"])[k])]
        base = {g: baseline_row(out, fraction, g, tasks) for g in ("rare", "common")}
        lines += [f"Rare and common items, fine-tuned on {'the whole' if Fraction(fraction) == 1 else fraction} "
                  f"training set (an item is rare when the rarest class its text names is named by fewer than "
                  f"{analysis.RARE} training examples; items in brackets):", "",
                  *table_lines(head, [(v, pair(r[fraction])) for v, r in rare.items()]
                               + [("trivial baseline", pair(base))]), ""]
    lines += ["The paper (BERT-base, Conceptual Captions scale, full training sets):", "",
              *table_lines(header, [(v, [f"{x:.1f}" for x in paper_row(v, tasks)]) for v in table if PAPER[v]])]
    return "\n".join(lines) + "\n"


def verdict(lo, hi, paper, close=None):
    """A claim's verdict (docs/METHOD.md section 14) from the 95% interval [lo, hi] of the toy's difference
    and the paper's difference: for a claim that one beats the other, "shown" (above zero, not at the
    paper's size), "consistent with the paper's size, not with zero", "contradicted" (below the paper's
    size and not above zero) or "too wide to say" (both zero and the paper's size inside); for a claim of
    closeness, "shown" (inside +-close), "contradicted" (outside) or "too wide to say"."""
    if np.isnan(lo):
        return "undecided (one seed: no interval)"
    if close is not None:
        inside, outside = -close <= lo and hi <= close, lo > close or hi < -close
        return "shown" if inside else "contradicted" if outside else "too wide to say"
    if lo > 0:
        return "consistent with the paper's size, not with zero" if lo <= paper <= hi else "shown"
    return "contradicted" if hi < paper else "too wide to say"


CLOSE = 2.0  # points: "close" means the 95% interval of the difference lies within +-2 points


def paper_row(variant, tasks):
    """The paper's figures of a variant in these tasks' columns."""
    return [x for x, c in zip(PAPER[variant], COLUMNS) if c[1] in tasks]


def claims(table, fractions, tasks=TASKS):
    """The paper's four claims (docs/METHOD.md §10), and U_SBU close to U, checked at each
    fraction on 95% intervals over the seeds of differences averaged over columns, seed by seed (a
    seed fixes the fine-tuning's data order and head, so runs of one seed are paired), over the
    columns of `tasks`."""
    retrieval = np.array([c[1] == "retrieval" for c in columns(tasks)])
    out = []
    for f in fractions:
        t = {v: runs[f] for v, runs in table.items()}

        def check(claim, diff, close=None, note=""):
            """diff(t): the difference per seed from t's (seeds, columns) arrays; the paper's from its
            one row per variant, where it has them all (it has no U_SBU row)."""
            per_seed = diff(t)
            m, lo, hi = analysis.seed_interval(per_seed)
            try:
                paper = round(float(diff({v: np.array([paper_row(v, tasks)]) for v in PAPER if PAPER[v]})[0]), 2)
            except KeyError:  # a variant the paper has no row for
                paper = None
            need = analysis.seeds_needed(per_seed, close / 2 if close else abs(paper) / 2)
            out.append({"claim": claim, "fraction": f, "verdict": verdict(lo, hi, paper, close),
                        "difference": round(m, 2), "interval": [round(lo, 2), round(hi, 2)], "paper": paper,
                        "seeds": len(per_seed), "seeds_needed": need, "figures": note})

        if {"U", "Base"} <= set(t):
            d = t["U"] - t["Base"]
            _, low, high = analysis.interval(d)
            up, down = int((low > 0).sum()), int((high < 0).sum())
            check("U beats Base", lambda t: (t["U"] - t["Base"]).mean(1),
                  note=f"U - Base per column: {up} above, {down} below, {len(retrieval) - up - down} undecided")
        if {"U", "U_NT"} <= set(t):  # claim 3's first half, the paper's Table 3: what the tags alone add
            check("U beats U_NT (tags help without aligned data)", lambda t: (t["U"] - t["U_NT"]).mean(1))
        if {"U", "S"} <= set(t) and not retrieval.all():
            check("U comes close to S outside retrieval", lambda t: (t["S"] - t["U"])[:, ~retrieval].mean(1), CLOSE)
        if {"U", "S"} <= set(t) and retrieval.any():
            check("S beats U on retrieval", lambda t: (t["S"] - t["U"])[:, retrieval].mean(1))
        if {"U", "U_NT", "S", "S_NT"} <= set(t):
            check("tags matter more without aligned data: (U - U_NT) - (S - S_NT) > 0",
                  lambda t: (t["U"] - t["U_NT"] - t["S"] + t["S_NT"]).mean(1),
                  note=f"U - U_NT {np.mean(t['U'] - t['U_NT']):+.1f}, "
                       f"S - S_NT {np.mean(t['S'] - t['S_NT']):+.1f} points")
        if {"U", "U_NC"} <= set(t):
            check("U_NC (no captions) stays close to U", lambda t: (t["U_NC"] - t["U"]).mean(1), CLOSE)
        if {"U", "U_SBU"} <= set(t):
            check("U_SBU (captions of another corpus) stays close to U", lambda t: (t["U_SBU"] - t["U"]).mean(1),
                  CLOSE)
        if {"H", "S"} <= set(t):
            check("H comes close to S", lambda t: (t["H"] - t["S"]).mean(1), CLOSE)
    return out


def pretraining_report(out, variants):
    """Each variant's held-out losses along its pre-training and whether they converged (CONVERGED)."""
    report = {}
    for v in variants:
        ev = storage.read_json(os.path.join(out, "pretrain", v, "eval.json"))
        curve, before = ev["curve"], ev["before"] or {}
        end = curve[-1]
        quarter = min(curve, key=lambda r: abs(r["step"] - 0.75 * end["step"]))  # the evaluation nearest 3/4
        why = []
        for k in end:
            if k in ("step", "match_acc"):
                continue
            fall = quarter[k] - end[k]
            if fall >= CONVERGED["noise"] and fall >= CONVERGED["last_quarter"] * end[k]:
                why.append(f"{k} fell {fall / end[k]:.0%} in the last quarter")
        if "match_acc" in end and end["match_acc"] < CONVERGED["match_acc"]:
            why.append(f"match accuracy {end['match_acc']:.2f}")
        report[v] = {"steps": end["step"], "before": before, "three_quarters": quarter, "after": end, "curve": curve,
                     "converged": not why, "not_converged_because": why}
    return report


def compute_report(out, variants, fractions, seeds, tasks=TASKS):
    """Sequences through the model: each pre-training run (steps x batch) against the largest
    fine-tuning run from it (steps x batch x sequences per example: NLVR2 2, retrieval 3)."""
    per = {"vqa": 1, "nlvr2": 2, "retrieval": 3, "refcoco": 1}
    report = {}
    for v in variants:
        args = storage.read_json(os.path.join(out, "pretrain", v, "args.json"))["args"]
        pre = args["max_steps"] * args["batch_size"]
        fine = 0
        for task, f, seed in itertools.product(tasks, fractions, seeds):
            run = finetuned(out, v, task, f, seed)
            with open(f"{run}/log.jsonl") as log:
                steps = max(json.loads(line).get("step", 0) for line in log)
            batch = storage.read_json(f"{run}/args.json")["args"]["batch_size"]
            fine = max(fine, steps * batch * per[task])
        report[v] = {"pretraining_sequences": pre, "largest_finetuning_sequences": fine,
                     "pretraining_at_least": pre >= fine}
    return report

# -----------------------------------------------------------------------------
# the grounding probe: the paper's mechanism measured directly on a pre-trained model, no fine-tuning


def load_model(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    model = VisualBERT(Config(**ckpt["config"]))
    load_weights(model, ckpt["model"], ckpt_path)
    return model.eval(), data.Vocab(ckpt["vocab"], source=ckpt_path)


def find_words(vocab, rows, words):
    """Where each of `words` occurs as a whole word in rows of pieces -> [(row, position of its first
    piece, word index)]. The longest name wins where names overlap ("fire truck" is no "truck")."""
    names = sorted(((vocab.encode(w), j) for j, w in enumerate(words)), key=lambda x: -len(x[0]))
    found = []
    for i, row in enumerate(rows):
        t = 0
        while t < len(row):
            for pieces, j in names:
                end = t + len(pieces)
                starts = row[t:end] == pieces and not vocab.continuation[row[t]]
                if starts and (end == len(row) or not vocab.continuation[row[end]]):
                    found.append((i, t, j))
                    t = end - 1
                    break
            t += 1
    return found


@torch.no_grad()
def word_states(model, vocab, captions, words):
    """Last-layer states of each word of `words` where it occurs in `captions` (each caption alone)
    -> (N, H) states and (N,) word indices."""
    b = data.text_inputs(vocab.encode_batch(captions), vocab, data.CAPTION_LEN)
    h, _ = model(**b)
    found = find_words(vocab, b["input_ids"].tolist(), words)
    return torch.stack([h[i, t] for i, t, _ in found]).float(), np.array([j for _, _, j in found])


@torch.no_grad()
def image_states(model, vocab, entries, class_names, tags):
    """The model on images with tags "shown" (the detector's), "hidden" (every tag piece replaced by
    [MASK], each keeping its region's box) or "none" (regions alone) -> per image, the states of its
    regions (K, H), and with tags the states at each region's first tag piece (K, H)."""
    b = data.image_inputs(entries, vocab.tag_pieces(class_names), tags != "none")
    if tags == "hidden":
        b["tag_ids"] = b["tag_ids"].masked_fill(b["tag_mask"], vocab.mask)
    h, spans = model.encode(b)
    out = []
    for i in range(len(entries)):
        K = int(b["region_mask"][i].sum())
        tag_states = None
        if tags != "none":
            where = b["tag_region"][i].tolist()
            first = [where.index(k) if k in where else -1 for k in range(K)]  # a tag cut off by MAX_TAGS: -1
            nan = torch.full_like(h[i, 0], float("nan"))
            tag_states = torch.stack([h[i, spans["tags"]][t] if t >= 0 else nan for t in first])
        out.append((h[i, spans["regions"]][:K].float(), tag_states))
    return out


def heldout(root):
    """The held-out images (their store), their scenes and the held-out captions."""
    images = data.Images([os.path.join(root, "features", "heldout")])
    with open(os.path.join(root, "heldout", "captions.txt")) as f:
        captions = [line.strip() for line in f if line.strip()]
    return images, storage.read_json(os.path.join(root, "scenes.json")), captions


MIN_WORDS = 3  # a class takes part in the nearest-word probe when the held-out captions have its word this often
PROBE = ["tag_first", "nearest_word", "cos_gap", "nearest_word_tags_shown", "detector"]  # probe's columns


@torch.no_grad()
def probe(model, vocab, images, scenes, captions, tags=True, chunk=100):
    """The grounding probe on held-out images, one row per region of an object (background stuff,
    which captions seldom name, is left out), its class the scene's truth:
      tag_first     (a) with every tag hidden ([MASK], keeping its box; so no tag is seen), whether
                    the MLM head ranks the region's own class word first among the detector's class
                    words at the region's tag (its first piece)
      nearest_word  (b) whether, of the classes whose word occurs >= MIN_WORDS times in the held-out
                    captions, the one whose mean last-layer word state is nearest (cosine) to the
                    region's last-layer state is its own; the image as the variant is fine-tuned but
                    its tags hidden (tags: [MASK]; _NT variants: regions alone). NaN for a region
                    whose class is not among them
      cos_gap       (b) the cosine to its own class's word state minus the mean to the others'
      nearest_word_tags_shown  (b) with the detector's tags shown, as Figure 2 draws the regions
      detector      whether the detector's own tag is the region's class (a reference for tag_first)
    Returns {column: (N,) array} and the number of classes in (b)."""
    names = images.class_names
    ws, wj = word_states(model, vocab, captions, names)
    have = np.bincount(wj, minlength=len(names)) >= MIN_WORDS
    among = np.flatnonzero(have)  # the classes of (b); a class's index among them:
    index = torch.from_numpy(np.cumsum(have) - 1)
    centre = torch.stack([ws[wj == j].mean(0) for j in among] or [ws[0]])  # (C, H)
    centre = torch.nn.functional.normalize(centre, dim=-1)
    first = torch.tensor([pieces[0] for pieces in vocab.tag_pieces(names)])
    rows = {k: [] for k in ["image", "class", *PROBE]}

    # (K, H) region states, (K,) their classes -> nearest word is its own, cosine gap; NaN without words
    def near(h, c):
        cos = torch.nn.functional.normalize(h, dim=-1) @ centre.T  # (K, C)
        own = cos.gather(1, index[c].clamp(min=0)[:, None]).squeeze(1)
        none = torch.from_numpy(~have)[c] | (len(among) < 2)
        nearest = (cos.argmax(1) == index[c]).double().masked_fill(none, float("nan"))
        gap = (own - (cos.sum(1) - own) / max(1, len(among) - 1)).double().masked_fill(none, float("nan"))
        return nearest.numpy(), gap.numpy()

    ids = sorted(images.where)
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        entries = [images[i] for i in part]
        hidden = image_states(model, vocab, entries, names, "hidden")
        plain = hidden if tags else image_states(model, vocab, entries, names, "none")
        shown = image_states(model, vocab, entries, names, "shown") if tags else plain
        for n, image in enumerate(part):
            objects = scenes[image]["objects"]
            keep = [k for k, o in enumerate(objects) if not o.get("background")]
            if not keep:
                continue
            c = torch.tensor([names.index(objects[k]["class"]) for k in keep])
            k = torch.tensor(keep)
            tag_logits = model.mlm(hidden[n][1][k])[:, first]  # (K, classes)
            nearest, gap = near(plain[n][0][k], c)
            rows["image"] += [start + n] * len(keep)
            rows["class"] += c.tolist()
            rows["tag_first"] += (tag_logits.argmax(1) == c).tolist()
            rows["nearest_word"] += nearest.tolist()
            rows["cos_gap"] += gap.tolist()
            rows["nearest_word_tags_shown"] += near(shown[n][0][k], c)[0].tolist()
            rows["detector"] += (torch.from_numpy(entries[n]["labels"][keep].astype(np.int64)) == c).tolist()
    return {k: np.array(v, dtype=np.float64) for k, v in rows.items()}, int(have.sum())


def probe_along(out, root, variant, columns=("tag_first", "nearest_word")):
    """The probe at each checkpoint the variant's pre-training kept (pretrain.py --keep-checkpoints: at a
    quarter, half and three quarters of its steps) and at its end, cached in OUT/pretrain/V/probe-STEP.npz
    -> [{"step", column: mean over the held-out regions}]."""
    folder = os.path.join(out, "pretrain", variant)
    kept = sorted(int(f[5:-3]) for f in os.listdir(folder) if f.startswith("ckpt-") and f.endswith(".pt"))
    along = []
    for step in kept:
        cache = os.path.join(folder, f"probe-{step}.npz")
        if not os.path.exists(cache):
            model, vocab = load_model(os.path.join(folder, f"ckpt-{step}.pt"))
            r, classes = probe(model, vocab, *heldout(root), tags=not variant.endswith("_NT"))
            np.savez(cache, classes=classes, **r)
        z = np.load(cache)
        along.append({"step": step, **{k: analysis.valid_mean(z[k]) for k in columns}})
    return along


def probe_report(out, root, variants):
    """The probe of every variant's pre-trained model (cached in OUT/pretrain/V/probe.npz), with its
    intervals, and U - U_NT with its interval."""
    images, scenes, captions = heldout(root)
    rows, report = {}, {}

    def estimate(r, column):
        return dict(zip(("value", "low", "high"), analysis.bootstrap(r, column)))

    for v in variants:
        cache = os.path.join(out, "pretrain", v, "probe.npz")
        if not os.path.exists(cache):
            model, vocab = load_model(os.path.join(out, "pretrain", v, "ckpt.pt"))
            r, classes = probe(model, vocab, images, scenes, captions, tags=not v.endswith("_NT"))
            np.savez(cache, classes=classes, **r)
        z = np.load(cache)
        rows[v] = {k: z[k] for k in z.files}
        report[v] = {k: estimate(rows[v], k) for k in PROBE}
        if v != "Base":
            end = storage.read_json(os.path.join(out, "pretrain", v, "eval.json"))["step"]
            report[v]["along"] = probe_along(out, root, v) + [
                {"step": end, **{k: analysis.valid_mean(rows[v][k]) for k in ("tag_first", "nearest_word")}}]
        report[v]["chance"] = {"tag_first": 1 / len(images.class_names),
                               "nearest_word": 1 / max(1, int(z["classes"]))}
    if {"U", "U_NT"} <= set(rows):
        report["U - U_NT"] = {k: estimate(rows["U"], rows["U"][k] - rows["U_NT"][k]) for k in PROBE[:4]}
    return report


def probe_markdown(report):
    """The probe's table, each number with its interval (in %, the cosine gap as it is), and chance."""
    cols = [("tag_first", "(a) own class word first, %", 100),
            ("nearest_word", "(b) nearest class word is own, %", 100),
            ("cos_gap", "(b) cosine own - others", 1), ("nearest_word_tags_shown", "(b) same, tags shown, %", 100)]

    def estimate(e, scale):
        d = 3 if scale == 1 else 1
        return f"{e['value'] * scale:.{d}f} [{e['low'] * scale:.{d}f}, {e['high'] * scale:.{d}f}]"

    lines = table_lines([c[1] for c in cols], [(v, [estimate(r[k], s) for k, _, s in cols]) for v, r in report.items()])
    chance = next(r["chance"] for r in report.values() if "chance" in r)
    det = next(r["detector"]["value"] for r in report.values() if "detector" in r)
    lines += ["", f"Chance: (a) {100 * chance['tag_first']:.1f}%, (b) {100 * chance['nearest_word']:.1f}%. "
                  f"The detector's own tag is the region's class for {100 * det:.1f}% of these regions. "
                  "Intervals: 95%, bootstrap over the held-out images."]
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# Figure 2: last-layer representations of words, tags and regions, projected to 2-D (analysis.py)


def representations(model, vocab, images, scenes, captions, classes, per_class=30, tags=True):
    """Last-layer states of words (class words in held-out captions), tags (each region's first tag
    piece) and regions (held-out images, tags shown as in fine-tuning), for the given classes, at
    most per_class of each -> (N, H) states, class index, modality."""
    names = images.class_names
    states, cls, modality, taken = [], [], [], Counter()  # taken: (class, modality) -> points kept

    def keep(h, c, m):
        if c in classes and taken[c, m] < per_class:
            taken[c, m] += 1
            states.append(h)
            cls.append(classes.index(c))
            modality.append(m)

    for h, j in zip(*word_states(model, vocab, captions, names)):
        keep(h, names[j], "word")
    ids = sorted(images.where)[:300]
    seen = image_states(model, vocab, [images[i] for i in ids], names, "shown" if tags else "none")
    for i, (regions, tag_states) in zip(ids, seen):
        truth = [o["class"] for o in scenes[i]["objects"]]
        for k in range(len(regions)):
            if tag_states is not None and not torch.isnan(tag_states[k]).any():
                keep(tag_states[k], names[int(images[i]["labels"][k])], "tag")  # a tag point has its tag's class
            keep(regions[k], truth[k], "region")
    return torch.stack(states).float(), np.array(cls), np.array(modality)


def figure2(args, probe=None):
    """Figure 2: one panel each for S, U and U_NT, titled with the probe's (b)."""
    images, scenes, captions = heldout(args.toy_root)
    counts = Counter(o["class"] for i in images.where for o in scenes[i]["objects"] if not o.get("background"))
    classes = sorted(counts, key=lambda c: (-counts[c], c))[:6]  # the most frequent classes
    panels = []
    for v in ("S", "U", "U_NT"):
        ckpt = os.path.join(args.out, "pretrain", v, "ckpt.pt")
        if not os.path.exists(ckpt):
            continue
        model, vocab = load_model(ckpt)
        tags = not v.endswith("_NT")
        h, cls, modality = representations(model, vocab, images, scenes, captions, classes, tags=tags)
        near = f", nearest word own {100 * probe[v]['nearest_word']['value']:.0f}%" if probe and v in probe else ""
        panels.append((f"{v}: t-SNE of last-layer states{near}", analysis.tsne(h).numpy(), cls, modality))
    if panels:
        return analysis.draw_figure(panels, classes, os.path.join(args.out, "figure2.png"))


LINES = [(0, 0, 0), (230, 25, 75), (0, 130, 200), (60, 180, 75), (145, 30, 180), (245, 130, 48), (70, 190, 190),
         (128, 128, 0)]


def curve_points(table, task, fractions, tasks=TASKS):
    """Per variant, per fraction: the task's columns averaged, seed by seed -> (mean, low, high)."""
    cols = [k for k, c in enumerate(columns(tasks)) if c[1] == task]
    return {v: [analysis.seed_interval(runs[f][:, cols].mean(1)) for f in fractions] for v, runs in table.items()}


def baselines(out, variant, fraction, tasks=TASKS):
    """Each task's trivial baseline (finetune.py's baseline.json: the commonest answer per question type,
    the majority class, chance, the most confident box), averaged over its table columns, in %."""
    runs = {t: storage.read_json(f"{finetuned(out, variant, t, fraction, 0)}/baseline.json") for t in tasks}
    return {t: float(np.mean([100 * runs[t][split][m] for _, task, split, m in COLUMNS if task == t]))
            for t in tasks}


def draw_curves(table, fractions, path, baseline=None, tasks=TASKS, w=420, h=320):
    """OUT/curves.png: one panel per task, its metric (the mean of its table columns) against the
    fraction of its training set, one line per variant, 95% interval bars over the seeds, and the
    task's trivial baseline (dashed) where given."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (2 * w, 2 * h + 40), "white")
    d = ImageDraw.Draw(img)
    names = {"vqa": "VQA accuracy", "nlvr2": "NLVR2 accuracy (dev, test-P)",
             "retrieval": "retrieval mean of R@1, R@5, R@10", "refcoco": "RefCOCO+ accuracy (val, testA, testB)"}
    xs = np.log2([float(Fraction(f)) for f in fractions])
    for j, task in enumerate(tasks):
        x0, y0 = (j % 2) * w, (j // 2) * h
        pts = curve_points(table, task, fractions, tasks)
        vals = [y for ps in pts.values() for x in ps for y in x if not np.isnan(y)]
        vals = np.clip(vals + ([baseline[task]] if baseline else []), 0, 100)  # percentages
        margin = 0.05 * (np.ptp(vals) + 1)
        lo, hi = max(0, vals.min() - margin), min(100, vals.max() + margin)
        left, right, top, bottom = x0 + 50, x0 + w - 15, y0 + 25, y0 + h - 35
        X = lambda x: (left + 25 + (x - xs.min()) / max(np.ptp(xs), 1e-9) * (right - left - 50) if len(xs) > 1
                       else (left + right) / 2)
        # an interval beyond the axis stops at it
        Y = lambda y: bottom - (min(max(y, lo), hi) - lo) / (hi - lo) * (bottom - top)
        d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        d.text((x0 + 10, y0 + 6), names[task] + ", %", fill="black")
        for k in range(5):  # y ticks
            y = lo + k * (hi - lo) / 4
            d.line([left - 4, Y(y), left, Y(y)], fill="black")
            d.text((x0 + 8, Y(y) - 6), f"{y:.1f}", fill="black")
        for x, f in zip(xs, fractions):
            d.text((X(x) - 10, bottom + 6), f, fill="black")
        d.text((left + (right - left) / 2 - 60, bottom + 20), "fraction of training set", fill=(90, 90, 90))
        if baseline:
            for x in range(int(left), int(right), 8):
                d.line([x, Y(baseline[task]), x + 4, Y(baseline[task])], fill=(150, 150, 150))
            d.text((right - 55, Y(baseline[task]) - 12), "baseline", fill=(150, 150, 150))
        for n, (v, ps) in enumerate(pts.items()):
            # side by side, so the bars show
            colour, dx = LINES[VARIANTS.index(v) % len(LINES)], (n - len(pts) / 2) * 2.5
            xy = [(X(x) + dx, Y(m)) for x, (m, _, _) in zip(xs, ps)]
            d.line(xy, fill=colour, width=2)
            for (px, py), (m, a, b) in zip(xy, ps):
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
                if not np.isnan(a):
                    d.line([px, Y(a), px, Y(b)], fill=colour)
                    d.line([px - 3, Y(a), px + 3, Y(a)], fill=colour)
                    d.line([px - 3, Y(b), px + 3, Y(b)], fill=colour)
    for n, v in enumerate(table):
        x = 10 + n * 100
        d.line([x, 2 * h + 20, x + 20, 2 * h + 20], fill=LINES[VARIANTS.index(v) % len(LINES)], width=3)
        d.text((x + 25, 2 * h + 14), v, fill="black")
    img.save(path)
    return img.size


def schedule(runs, seconds, jobs):
    """Wall seconds of `runs` on `jobs` workers if each run took `seconds[i]` and started, as execute()
    starts them, in plan order as soon as a worker is free and the runs it needs are done; the first
    run (the toy BERT) alone before them."""
    if any(math.isnan(x) for x in seconds):
        return float("nan")
    done, todo, running, now = {id(runs[0])}, list(range(1, len(runs))), [], seconds[0]
    while todo or running:
        ready = [i for i in todo if all(id(d) in done for d in runs[i].after)]
        for i in ready[: jobs - len(running)]:
            todo.remove(i)
            running.append((now + seconds[i], i))
        if not running:
            raise ValueError(f"{runs[todo[0]].name}: a run it needs is not planned")
        running.sort()
        now, i = running.pop(0)
        done.add(id(runs[i]))
    return now


def time_report(runs, jobs):
    """Wall and CPU time of every run (time.json), and the wall time they would take on an idle CPU
    with `jobs` and with more workers (one core each): the toy BERT's wall time, then each run's CPU
    time, scheduled as execute() schedules them."""
    files = [os.path.join(r.out, "time.json") for r in runs]
    t = [storage.read_json(f) if os.path.exists(f) else {} for f in files]
    cpu = [x.get("cpu_s", float("nan")) for x in t]
    seconds = [t[0].get("wall_s", float("nan")), *cpu[1:]]

    def task_cpu(task):
        return round(float(np.mean([c for r, c in zip(runs, cpu) if r.argv[1:3] == ["--task", task]])), 1)

    return {"wall_min": round(sum(x.get("wall_s", 0) for x in t) / 60, 1), "cpu_min": round(sum(cpu) / 60, 1),
            "idle_wall_min": round(schedule(runs, seconds, jobs) / 60, 1),
            "idle_wall_min_by_jobs": {n: round(schedule(runs, seconds, n) / 60, 1) for n in (2, 4, 8, 16, 32)},
            "finetune_cpu_s_by_task": {task: task_cpu(task) for task in TASKS
                                       if any(r.argv[1:3] == ["--task", task] for r in runs)}}


def chosen(args):
    """The rows to run, in VARIANTS' order: --variants, or those of --quick, or all; always Base,
    the toy BERT that every variant starts from."""
    return [v for v in VARIANTS if v == "Base" or v in (args.variants or (QUICK if args.quick else VARIANTS))]


def chosen_tasks(args):
    """--tasks, or those of --quick, or all, in TASKS' order."""
    return [t for t in TASKS if t in (args.tasks or (QUICK_TASKS if args.quick else TASKS))]


def fractions(args):
    """--fractions, or 1/16 with --quick, or FRACTIONS."""
    return args.fractions or (["1/16"] if args.quick else FRACTIONS)


def finite(x):
    """JSON has no NaN: an interval that one seed cannot give is null."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def read_budget(args):
    """BUDGET with the changes of --budget KEY=N; an unknown key or a bad number stops with a message."""
    budget = dict(BUDGET)
    for kv in args.budget:
        k, _, v = kv.partition("=")
        if k not in budget:
            parser.error(f"--budget {kv}: the budgets are {', '.join(budget)}")
        try:
            budget[k] = float(v) if k in TASKS else int(v)  # fine-tuning epochs; the rest are steps
        except ValueError:
            parser.error(f"--budget {kv}: {v!r} is not a {'number' if k in TASKS else 'whole number'}")
        if not (math.isfinite(budget[k]) and budget[k] > 0):
            parser.error(f"--budget {kv}: a budget is above 0")
    return budget


def check_fractions(fractions):
    for f in fractions:
        try:
            ok = 0 < Fraction(f) <= 1
        except ValueError:
            ok = False
        if not ok:
            parser.error(f"--fractions {f}: a fraction in (0, 1], such as 1/16")


def pretraining_markdown(pre, compute, probe):
    """A line per variant: its held-out losses and the probe at each evaluated step, its compute, and
    whether its losses still fell in the last quarter (CONVERGED; reported, not a gate)."""
    md = "\nPre-training, the same steps for every variant: held-out losses before and at each evaluation, the " \
         "probe's (a) and (b) (%) at the same steps; converged: each loss fell by under " \
         f"{CONVERGED['last_quarter']:.0%} of its value (or {CONVERGED['noise']}) in the last quarter, " \
         f"and match accuracy >= {CONVERGED['match_acc']:.2f} where there is one:\n\n"
    for v, r in pre.items():
        steps = " / ".join(str(c["step"]) for c in r["curve"])
        losses = "; ".join(f"{k} {r['before'].get(k, float('nan')):.3f} -> "
                           + " / ".join(f"{c[k]:.3f}" for c in r["curve"]) for k in r["after"] if k != "step")
        along = probe.get(v, {}).get("along", [])
        grounding = ("; probe (a) " + " / ".join(f"{100 * p['tag_first']:.1f}" for p in along)
                     + ", (b) " + " / ".join(f"{100 * p['nearest_word']:.1f}" for p in along)) if along else ""
        converged = "yes" if r["converged"] else "no, " + "; ".join(r["not_converged_because"])
        md += f"- {v}, steps {steps}, {compute[v]['pretraining_sequences']} sequences (largest fine-tuning run " \
              f"{compute[v]['largest_finetuning_sequences']}): {losses}{grounding}; converged: {converged}\n"
    return md


def learns_markdown(learns):
    """Does Base leave each task's trivial baseline, at each fraction (docs/METHOD.md sections 13 and 14)."""
    def one(t, m, lo, hi):
        return f"{t} {m:+.1f}" + ("" if np.isnan(lo) else f" [{lo:.1f}, {hi:.1f}]")
    return "".join(f"\nBase minus the trivial baseline on {'the whole' if Fraction(f) == 1 else f} training set, the "
                   "mean of each task's columns, in points: " + ", ".join(one(t, *x) for t, x in by_task.items()) + "."
                   for f, by_task in learns.items()) \
        + " The budgets were chosen on one seed of Base, 10 points up on the whole set (docs/METHOD.md section 14).\n"


def claims_markdown(verdicts):
    def needed(c):  # what more seeds would do for a claim they could decide
        n = c["seeds_needed"]
        if c["verdict"] != "too wide to say" or n is None:
            return ""
        if 0 < n <= c["seeds"]:  # narrow enough already: it lies across a bound of +-CLOSE
            return f", narrow, across the +-{CLOSE:g} bound"
        return f", {n} would decide it" if n else ", more than 31 would be needed"

    def line(c):
        lo, hi = c["interval"]
        return (f"- {c['claim']}, fraction {c['fraction']}: {c['verdict']} ({c['difference']:+.1f}"
                + ("" if np.isnan(lo) else f" [{lo:.1f}, {hi:.1f}]") + ")"
                + ("" if c["paper"] is None else f"; the paper {c['paper']:+.1f}")
                + f"; {c['seeds']} seeds" + needed(c)
                + (f"; {c['figures']}" if c["figures"] else ""))

    return "\nThe paper's claims, on 95% intervals over seeds of differences averaged over the columns " \
           f"(close: the interval within +-{CLOSE:g} points), beside the paper's difference " \
           "(docs/METHOD.md section 14):\n\n" + "\n".join(map(line, verdicts)) + "\n"


def detector_markdown(d):
    """The made world's simulated detector (toy.detector_report), in two lines."""
    probe = " / ".join(f"{100 * d['probe'][k]:.1f}" for k in ("1", "5", "10", "30"))
    return (f"\nThe toy world's detector (held-out regions): tags right {100 * d['tag_accuracy']:.1f}%, colours "
            f"{100 * d['attribute_accuracy']:.1f}%; a linear probe of the features {probe}% at 1 / 5 / 10 / 30 "
            f"examples per class, {100 * d['probe']['all']:.1f}% on all pre-training regions.\n")


def table_json(table, fractions, seeds, budget, reports, tasks=TASKS):
    """OUT/table.json: the settings, every run's numbers, their means and intervals, the reports."""
    stats = {v: {f: analysis.interval(t[f]) for f in fractions} for v, t in table.items()}
    return finite({
        "columns": [c[0] for c in columns(tasks)], "fractions": fractions, "seeds": seeds, "budget": budget,
        "runs": {v: {f: t[f].round(2).tolist() for f in fractions} for v, t in table.items()},
        "mean": {v: {f: s[0].round(2).tolist() for f, s in st.items()} for v, st in stats.items()},
        "interval": {v: {f: np.stack(s[1:], 1).round(2).tolist() for f, s in st.items()} for v, st in stats.items()},
        "interval_method": "95% Student t-interval over the fine-tuning seeds (null with one seed)",
        **reports, "paper": {v: PAPER[v] and paper_row(v, tasks) for v in table}})


def main(argv=None):
    args = parser.parse_args(argv)
    budget = read_budget(args)
    args.fractions = fractions(args)
    check_fractions(args.fractions)
    args.variants = chosen(args)
    args.tasks = chosen_tasks(args)
    args.jobs = args.jobs or default_jobs()
    seeds = list(range((1 if args.quick else 3) if args.seeds is None else args.seeds))
    guards.check_paths(args, {"out": "out", "toy_root": "out"})
    with guards.OutFolder(args.out) as out, guards.Interrupt() as ctrl_c:
        out.make()  # one reproduction at a time in --out: a second one is refused
        return reproduce(args, budget, seeds, ctrl_c)


def reproduce(args, budget, seeds, ctrl_c):
    """Every run not done yet, then the table, the probe, the claims and the figures."""
    t0 = time.time()
    toy.make_toy_world(args.toy_root)
    same_world(args.out)
    print(f"variants {', '.join(args.variants)}; tasks {', '.join(args.tasks)}; fractions {', '.join(args.fractions)}; "
          f"seeds {seeds}; budget "
          + ", ".join(f"{k} {v}" for k, v in budget.items()))
    runs = plan(args, budget, seeds)
    for run in [r for r in runs if r.done()]:  # a folder of an older reproduction: its runs are the plan's
        same_settings(run)
        if run.argv[0] == "pretrain.py":  # and its pre-trainings' weights fingerprinted
            same_weights(run)
    execute(runs[:1], 1, ctrl_c, BERT_THREADS)  # the toy BERT, alone: all else starts from it
    execute(runs[1:], args.jobs, ctrl_c)
    if ctrl_c.asked:
        done = sum(r.done() for r in runs)
        ctrl_c.stop(f"{done} of {len(runs)} runs done, the others stopped where they were and saved; the same command "
                    f"goes on from there", 1)

    torch.set_num_threads(1)  # the probe and the figures are small; spare threads only spin on a shared CPU
    tasks = args.tasks
    table = collect(args.out, args.variants, args.fractions, seeds, tasks)
    rare = collect_by_class(args.out, args.variants, args.fractions, seeds, tasks)
    learns = {f: base_learns(table, args.out, f, tasks) for f in args.fractions}
    reports = {"base_against_baseline": learns,
               "by_class": by_class_report(rare, args.fractions, tasks),
               "pretraining": pretraining_report(args.out, args.variants),
               "compute": compute_report(args.out, args.variants, args.fractions, seeds, tasks),
               "probe": probe_report(args.out, args.toy_root, args.variants),
               "time": time_report(runs, args.jobs), "claims": claims(table, args.fractions, tasks),
               "detector": toy.detector_report(args.toy_root)}
    md = (markdown(table, args.fractions, args.out, rare, tasks) + learns_markdown(learns)
          + pretraining_markdown(reports["pretraining"], reports["compute"], reports["probe"])
          + "\nThe grounding probe (held-out regions, no fine-tuning):\n\n" + probe_markdown(reports["probe"])
          + detector_markdown(reports["detector"]) + claims_markdown(reports["claims"]))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    storage.write_json(os.path.join(args.out, "table.json"), table_json(table, args.fractions, seeds, budget, reports, tasks))
    print("\n" + md)
    size = draw_curves(table, args.fractions, os.path.join(args.out, "curves.png"),
                       baselines(args.out, "Base", args.fractions[-1], tasks), tasks)
    print(f"curves: {os.path.join(args.out, 'curves.png')} ({size[0]}x{size[1]})")
    size = figure2(args, reports["probe"])
    if size:
        print(f"figure 2: {os.path.join(args.out, 'figure2.png')} ({size[0]}x{size[1]})")
    print(f"table: {os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'table.json')}; "
          f"{(time.time() - t0) / 60:.1f} min in all")
    timing = reports["time"]
    print(f"all runs: {timing['cpu_min']} min of CPU time and {timing['wall_min']} min of wall time, summed; "
          f"on an idle CPU with {args.jobs} at a time, about {timing['idle_wall_min']} min; with more at a time, "
          + ", ".join(f"{n}: {m}" for n, m in timing["idle_wall_min_by_jobs"].items()))
    return table


if __name__ == "__main__":
    main()
