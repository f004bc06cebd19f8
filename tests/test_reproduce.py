"""reproduce.py and analysis.py: the table and the claims on a made-up result set, the projections on points of
known structure, and Figure 2's picture."""

import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import analysis  # noqa: E402
import storage  # noqa: E402
import data  # noqa: E402
import reproduce  # noqa: E402
import toy  # noqa: E402
from toy import make_toy_world  # noqa: E402
from model import Config, VisualBERT, masked_lm_sum  # noqa: E402


def write_results(out, variant, task_fraction_seed, acc):
    """Results files as finetune.py writes them, every metric of a run equal to `acc`."""
    results = {"vqa": {"val": {"accuracy": acc}}, "nlvr2": {"dev": {"accuracy": acc, "consistency": 0.1}, "test1": {"accuracy": acc}},
               "retrieval": {"test": {"R@1": acc, "R@5": acc, "R@10": acc}},
               "refcoco": {s: {"accuracy": acc} for s in ("val", "testA", "testB")}}
    fraction, seed = task_fraction_seed
    for task, res in results.items():
        folder = out / "finetune" / variant / task / reproduce.label(fraction) / f"seed{seed}"
        os.makedirs(folder)
        (folder / "results.json").write_text(json.dumps({"task": task, **res}))


def test_table_intervals_and_claims_from_results_files(tmp_path):
    accs = {"Base": [0.50, 0.52, 0.54], "U": [0.60, 0.62, 0.64], "U_NT": [0.50, 0.52, 0.54],
            "S": [0.60, 0.61, 0.65], "S_NT": [0.58, 0.60, 0.62], "U_NC": [0.70, 0.72, 0.74], "U_SBU": [0.605, 0.62, 0.635]}
    for v, runs in accs.items():
        for seed, a in enumerate(runs):
            write_results(tmp_path, v, ("1/4", seed), a)
            write_results(tmp_path, v, ("1", seed), a + 0.1)
    table = reproduce.collect(str(tmp_path), list(accs), ["1/4", "1"], [0, 1, 2])
    assert table["U"]["1/4"].shape == (3, len(reproduce.COLUMNS))
    assert np.allclose(table["U"]["1/4"][:, 0], [60, 62, 64]) and np.allclose(table["U"]["1"][:, 0], [70, 72, 74])
    m, lo, hi = analysis.interval(table["U"]["1/4"])
    assert np.allclose(m, 62) and np.allclose(hi - m, 4.303 * 2 / np.sqrt(3))  # t(2 df) times the standard error
    md = reproduce.markdown(table, ["1/4", "1"])
    assert "| U | 62.0 [57.0, 67.0] |" in md and "| U | 72.0 [67.0, 77.0] |" in md
    assert "| U | 70.7 | 71.7 |" in md  # the paper's row; U_SBU has none
    assert "| U_SBU | 62.0 [58.3, 65.7] |" in md and "| U_SBU | 62.0 |" not in md
    verdicts = {(c["claim"], c["fraction"]): c for c in reproduce.claims(table, ["1/4", "1"])}
    assert verdicts["U beats Base", "1/4"]["verdict"] == "shown"  # +10 in every seed
    assert "9 above, 0 below" in verdicts["U beats Base", "1/4"]["figures"]
    # the paper's figure for each claim, by hand from its Tables 1-3: U - Base over the nine columns is
    # (1.48 + 3.34 + 2.37 + 12.51 + 9.31 + 6.56 + 1.76 + 2.05 + 2.76) / 9 = 4.68; S - U on retrieval is
    # (5.82 + 3.39 + 2.06) / 3 = 3.76; it has no U_SBU row
    assert verdicts["U beats Base", "1/4"]["paper"] == 4.68
    assert verdicts["S beats U on retrieval", "1"]["paper"] == 3.76
    # U - U_NT: (0.87 + 3.84 + 2.10 + 4.81 + 2.71 + 1.52 + 0.48 + 1.32 + 1.81) / 9 = 2.16; here +10 in every seed
    assert verdicts["U beats U_NT (tags help without aligned data)", "1"]["paper"] == 2.16
    assert verdicts["U beats U_NT (tags help without aligned data)", "1"]["verdict"] == "shown"
    assert verdicts["U_SBU (captions of another corpus) stays close to U", "1"]["paper"] is None
    # S - U is 0, -1, +1 by seed: the interval +-4.303 / sqrt(3) = +-2.48, wider than +-2; 7 seeds would
    # narrow it below +-1 (t(6) / sqrt(7) = 2.447 / 2.646 = 0.92; with 6, 2.571 / 2.449 = 1.05)
    close = verdicts["U comes close to S outside retrieval", "1/4"]
    assert close["verdict"] == "too wide to say" and close["seeds"] == 3 and close["seeds_needed"] == 7
    assert "too wide to say (+0.0 [-2.5, 2.5]); the paper +1.1; 3 seeds, 7 would decide it" in \
        reproduce.claims_markdown([close])
    across = {**close, "difference": 2.2, "interval": [1.6, 2.8], "seeds_needed": 3}  # as step 1 of v3 gave
    assert "too wide to say (+2.2 [1.6, 2.8]); the paper +1.1; 3 seeds, narrow, across the +-2 bound" in \
        reproduce.claims_markdown([across])
    # on retrieval the interval [-2.48, 2.48] holds zero but not the paper's +3.76
    assert verdicts["S beats U on retrieval", "1/4"]["verdict"] == "contradicted"
    assert verdicts["tags matter more without aligned data: (U - U_NT) - (S - S_NT) > 0", "1"]["verdict"] == "shown"
    assert verdicts["U_NC (no captions) stays close to U", "1/4"]["verdict"] == "contradicted"  # 10 points apart in every seed
    assert verdicts["U_SBU (captions of another corpus) stays close to U", "1"]["verdict"] == "shown"  # -0.5 to +0.5 points by seed
    assert reproduce.verdict(0.5, 6.0, 4.68) == "consistent with the paper's size, not with zero"
    assert reproduce.verdict(-0.5, 6.0, 4.68) == "too wide to say"
    assert reproduce.verdict(-3.0, -1.0, 4.68) == "contradicted"
    one = reproduce.collect(str(tmp_path), ["U", "Base"], ["1"], [0])
    assert reproduce.claims(one, ["1"])[0]["verdict"].startswith("undecided (one seed")


def test_a_subset_of_tasks_is_planned_read_and_checked_on_its_columns_alone(tmp_path):
    """--tasks (and --quick's tasks): the runs, the table, the paper's figures and the claims of those tasks."""
    assert reproduce.chosen_tasks(reproduce.parser.parse_args(["--quick"])) == reproduce.QUICK_TASKS
    args = reproduce.parser.parse_args(["--out", str(tmp_path), "--tasks", "retrieval", "vqa", "--fractions", "1"])
    args.variants = reproduce.chosen(args)
    ft = [r for r in reproduce.plan(args, dict(reproduce.BUDGET), [0]) if r.argv[0] == "finetune.py"]
    assert [r.argv[r.argv.index("--task") + 1] for r in ft] == ["vqa", "retrieval"] * len(reproduce.VARIANTS)
    accs = {"Base": [0.50, 0.52, 0.54], "U": [0.60, 0.62, 0.64], "S": [0.60, 0.61, 0.65]}
    for v, runs in accs.items():
        for seed, a in enumerate(runs):
            write_results(tmp_path, v, ("1", seed), a)
    tasks = ["vqa", "retrieval"]
    table = reproduce.collect(str(tmp_path), list(accs), ["1"], [0, 1, 2], tasks)
    assert table["U"]["1"].shape == (3, 4)  # VQA, R@1, R@5, R@10
    md = reproduce.markdown(table, ["1"], tasks=tasks)
    assert "| model | VQA | R@1 | R@5 | R@10 |" in md and "| U | 70.7 | 55.4 | 82.9 | 89.8 |" in md
    verdicts = {c["claim"]: c for c in reproduce.claims(table, ["1"], tasks)}
    # outside retrieval there is VQA alone: the paper's S - U is 70.87 - 70.74 = 0.13; on retrieval 3.76 as before
    assert verdicts["U comes close to S outside retrieval"]["paper"] == 0.13
    assert verdicts["S beats U on retrieval"]["paper"] == 3.76
    assert "4 above, 0 below, 0 undecided" in verdicts["U beats Base"]["figures"]  # +10 in every column and seed
    no_retrieval = reproduce.collect(str(tmp_path), list(accs), ["1"], [0, 1, 2], ["vqa", "refcoco"])
    assert "S beats U on retrieval" not in {c["claim"] for c in reproduce.claims(no_retrieval, ["1"], ["vqa", "refcoco"])}


def test_the_toy_bert_gets_the_same_threads_on_any_machine(tmp_path, monkeypatch):
    """The number of threads changes the weights (docs/LOG.md 19), so the toy BERT, which every row starts
    from, runs on BERT_THREADS whatever the cores: a folder carried between machines gets its weights again."""
    calls = []

    def execute(runs, jobs, ctrl_c, threads=1):
        calls.append((runs[0].name, len(runs), jobs, threads))
        raise SystemExit("stopped here")

    monkeypatch.setattr(reproduce, "execute", execute)
    monkeypatch.setattr(reproduce.toy, "make_toy_world", lambda root: root)
    for cores in (1, 8, 64):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        with pytest.raises(SystemExit, match="stopped here"):
            reproduce.main(["--out", str(tmp_path / f"out{cores}"), "--toy-root", str(tmp_path / "world")])
    assert calls == [("Base (the toy BERT)", 1, 1, reproduce.BERT_THREADS)] * 3


@pytest.mark.skipif(not reproduce.has_avx2(), reason="a Linux x86 CPU with AVX2")
def test_the_reproduction_adds_with_the_avx2_kernels_on_any_x86_cpu():
    """A CPU with AVX-512 would take wider kernels and give other weights (docs/LOG.md 22 A): run as a script,
    reproduce.py sets torch, MKL and oneDNN to their AVX2 kernels before torch loads, keeping a value set
    already; imported, it leaves the process alone."""
    def run(start, **env):
        script = (f"import os, runpy, sys\nsys.argv = ['reproduce.py', '--help']\ntry:\n    {start}\n"
                  "except SystemExit:\n    pass\nimport torch\nprint(torch.backends.cpu.get_cpu_capability(), "
                  "*(os.environ.get(k) for k in ('ATEN_CPU_CAPABILITY', 'MKL_CBWR', 'ONEDNN_MAX_CPU_ISA')))\n")
        clean = {k: v for k, v in os.environ.items() if k not in reproduce.AVX2}
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout
        return out.split()[-4:]

    assert run("runpy.run_path('reproduce.py', run_name='__main__')") == ["AVX2", "avx2", "AVX2", "AVX2"]
    assert run("runpy.run_path('reproduce.py', run_name='__main__')", MKL_CBWR="COMPATIBLE") == ["AVX2", "avx2", "COMPATIBLE", "AVX2"]
    assert run("import reproduce")[1:] == ["None"] * 3


def test_missing_result_is_a_clear_error(tmp_path):
    write_results(tmp_path, "U", ("1", 0), 0.5)
    os.remove(tmp_path / "finetune" / "U" / "vqa" / "f1" / "seed0" / "results.json")
    with pytest.raises(FileNotFoundError, match="finetune/U/vqa/f1/seed0/results.json"):
        reproduce.collect(str(tmp_path), ["U"], ["1"], [0])


def test_pca_recovers_a_plane_embedded_in_higher_dimensions():
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(200, 2, generator=g) * torch.tensor([5.0, 2.0])  # (N, 2), the larger spread first
    basis, _ = torch.linalg.qr(torch.randn(10, 2, generator=g))  # (10, 2) orthonormal
    x = (plane @ basis.T + 3.0).double()  # (N, 10), shifted
    y = analysis.pca(x)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(plane.double(), plane.double()), atol=1e-6)  # same distances: a rotation of the plane
    assert y[:, 0].var() > y[:, 1].var()


def test_tsne_keeps_clusters_apart():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 20, generator=g) * 6
    labels = torch.arange(4).repeat_interleave(40)
    x = centres[labels] + torch.randn(160, 20, generator=g)  # 4 clusters in 20-D
    y = analysis.tsne(x, perplexity=15, steps=300)
    assert y.shape == (160, 2) and torch.isfinite(y).all()
    d = torch.cdist(y, y).fill_diagonal_(float("inf"))
    assert (labels[d.argmin(1)] == labels).float().mean() > 0.95  # each point's nearest neighbour is of its cluster
    within = torch.stack([torch.cdist(y[labels == k], y[labels == k]).mean() for k in range(4)]).mean()
    between = torch.cdist(torch.stack([y[labels == k].mean(0) for k in range(4)]), torch.stack([y[labels == k].mean(0) for k in range(4)]))
    assert between[~torch.eye(4, dtype=torch.bool)].min() > 2 * within


def test_figure_has_one_panel_per_variant_with_each_class_colour(tmp_path):
    classes = ["dog", "cat", "car"]
    rng = np.random.default_rng(0)
    cls = np.repeat(np.arange(3), 6)
    modality = np.array(["word", "tag", "region"] * 6)
    panels = [(name, rng.normal(size=(18, 2)), cls, modality) for name in ("S", "U", "U_NT")]
    size = analysis.draw_figure(panels, classes, tmp_path / "figure2.png")
    img = Image.open(tmp_path / "figure2.png").convert("RGB")
    assert img.size == size == (3 * analysis.PANEL, analysis.PANEL + analysis.LEGEND)
    pixels = np.asarray(img)
    for j in range(3):
        panel = pixels[: analysis.PANEL, j * analysis.PANEL:(j + 1) * analysis.PANEL].reshape(-1, 3)
        present = {tuple(c) for c in panel}
        for k in range(3):
            assert analysis.PALETTE[k] in present  # every class is drawn in every panel
    assert analysis.PALETTE[3] not in {tuple(c) for c in pixels.reshape(-1, 3)}  # no fourth class


def test_plan_pretrains_each_variant_once_from_one_bert_and_finetunes_every_fraction(tmp_path):
    args = reproduce.parser.parse_args(["--out", str(tmp_path), "--toy-root", "toy", "--fractions", "1/16", "1"])
    args.variants = reproduce.chosen(args)
    assert reproduce.chosen(reproduce.parser.parse_args(["--quick"])) == reproduce.QUICK
    assert reproduce.chosen(reproduce.parser.parse_args(["--variants", "S", "U"])) == ["Base", "U", "S"]
    budget = dict(reproduce.BUDGET)
    runs = reproduce.plan(args, budget, [0, 1])
    pre = [r for r in runs if r.argv[0] == "pretrain.py" and "--text-only" not in r.argv]
    assert len(pre) == len(reproduce.VARIANTS) - 1  # once each, whatever the seeds
    assert all(r.argv[r.argv.index("--init-from") + 1] == f"{tmp_path}/pretrain/Base/ckpt.pt" for r in pre)
    assert {r.argv[r.argv.index("--max-steps") + 1] for r in pre} == {str(budget["pretrain"])}
    sbu = next(r for r in pre if r.out.endswith("/U_SBU"))
    assert "toy/pretrain/captions_sbu.txt" in sbu.argv and "--unaligned" in sbu.argv
    ft = [r for r in runs if r.argv[0] == "finetune.py"]
    assert len(ft) == 2 * 2 * len(reproduce.VARIANTS) * 4  # seeds x fractions x variants x tasks
    base = [r for r in ft if "/Base/" in r.out]
    assert all(r.argv[r.argv.index("--init-from") + 1] == f"{tmp_path}/pretrain/Base/ckpt.pt" for r in base)
    assert all(("--no-tags" in r.argv) == ("_NT" in r.out) for r in ft)
    for r in ft:  # a fraction F trains for epochs / F: the same number of steps as the whole set
        task, f = r.argv[r.argv.index("--task") + 1], float(r.argv[r.argv.index("--train-fraction") + 1])
        assert f in (1 / 16, 1.0) and float(r.argv[r.argv.index("--epochs") + 1]) == pytest.approx(budget[task] / f)
        assert len({x.out for x in ft}) == len(ft)  # one folder each
    bert = runs[0].argv  # the preset is the toy BERT's; every variant inherits it through --init-from
    assert "--text-only" in bert and bert[bert.index("--model") + 1] == "tiny"
    args = reproduce.parser.parse_args(["--out", str(tmp_path), "--model", "small"])
    args.variants = reproduce.chosen(args)
    bert = reproduce.plan(args, budget, [0])[0].argv
    assert bert[bert.index("--model") + 1] == "small"


# -----------------------------------------------------------------------------
# the grounding probe, on a hand-made world whose answers are known

CLASSES = ["dog", "cat", "car", "cup", "bus", "hat"]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """60 images of 3 regions of distinct classes, side by side (left, middle, right thirds); each
    region's feature is the one-hot of its class and its tag is right; captions name every class."""
    out = tmp_path_factory.mktemp("handmade")
    r = np.random.default_rng(0)
    w = storage.FeatureWriter(str(out / "store"), len(CLASSES), CLASSES)
    scenes = {}
    for i in range(60):
        cls = r.choice(len(CLASSES), 3, replace=False)
        boxes = np.array([[k / 3, 0, (k + 1) / 3, 1] for k in range(3)], dtype=np.float32)
        w.add(f"im{i}", np.eye(len(CLASSES))[cls], boxes, cls, np.ones(3), 640, 480)
        scenes[f"im{i}"] = {"objects": [{"class": CLASSES[c]} for c in cls]}
    w.close()
    captions = [f"a {CLASSES[i % 6]} and a {CLASSES[(i + 1) % 6]} ." for i in range(30)]
    vocab = data.Vocab(list(data.Vocab.RESERVED) + ["a", "and", "."] + CLASSES)
    return data.Images([str(out / "store")]), scenes, captions, vocab


def small_model(vocab):
    torch.manual_seed(0)
    return VisualBERT(Config(vocab_size=len(vocab), hidden=32, layers=1, heads=2, ffn=64, max_positions=32, feat_dim=len(CLASSES),
                             num_labels=len(CLASSES), dropout=0.0, init_std=32 ** -0.5))


def test_find_words_takes_whole_words_and_the_longest_name():
    vocab = data.Vocab(list(data.Vocab.RESERVED) + ["a", "fire", "truck", "dog", "##s", "hot", "."])
    rows = [vocab.encode_batch(["a fire truck and a truck ."])[0], vocab.encode_batch(["a dogs hot dog ."])[0]]
    found = reproduce.find_words(vocab, rows, ["truck", "fire truck", "dog", "hot dog"])
    assert sorted(found) == [(0, 1, 1), (0, 5, 0), (1, 3, 3)]  # "dogs" is no "dog"; "hot dog" wins over "dog"


def test_probe_a_region_names_its_class_once_the_model_has_learned_to(handmade):
    """(a): chance for an untrained model; all right after 150 steps of predicting every masked tag
    from the regions (each tag must find its region by the box they share)."""
    images, scenes, captions, vocab = handmade
    model = small_model(vocab)
    rows, _ = reproduce.probe(model.eval(), vocab, images, scenes, captions)
    assert rows["tag_first"].mean() < 0.4 and len(rows["tag_first"]) == 180 and rows["detector"].mean() == 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, pieces = sorted(images.where), vocab.tag_pieces(CLASSES)
    model.train()
    for step in range(150):
        b = data.image_inputs([images[i] for i in ids[(step * 16) % 48:(step * 16) % 48 + 16]], pieces)
        labels = b["tag_ids"].masked_fill(~b["tag_mask"], -100)
        b["tag_ids"] = b["tag_ids"].masked_fill(b["tag_mask"], vocab.mask)
        h, spans = model(**{k: b[k] for k in ("tag_ids", "tag_boxes", "tag_mask", "feats", "boxes", "region_mask")})
        loss = masked_lm_sum(model.mlm, h[:, spans["tags"]], labels) / (labels != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows, _ = reproduce.probe(model.eval(), vocab, images, scenes, captions)
    assert rows["tag_first"].mean() > 0.95


@torch.no_grad()
def set_by_hand(model, vocab, mapping):
    """A model whose every state is LayerNorm of its input embedding (no attention or FFN output, no
    positions, segments or boxes), and whose feature projection sends class c's one-hot feature to
    the word embedding of class mapping[c]: a region's state is then that word's state."""
    emb = model.embeddings
    for t in (emb.position_embeddings.weight, emb.token_type_embeddings.weight, emb.box[0].weight, emb.box[0].bias, emb.feat[0].bias):
        t.zero_()
    for layer in model.layers:
        for t in (layer.attn.out.weight, layer.attn.out.bias, layer.ffn_out.weight, layer.ffn_out.bias):
            t.zero_()
    for c, m in enumerate(mapping):
        emb.feat[0].weight[:, c] = emb.word_embeddings.weight[vocab.encode(CLASSES[m])[0]]
    return model.eval()


def test_probe_b_region_states_at_their_class_words_or_at_others(handmade):
    images, scenes, captions, vocab = handmade
    right = set_by_hand(small_model(vocab), vocab, range(len(CLASSES)))
    rows, classes = reproduce.probe(right, vocab, images, scenes, captions, tags=False)
    assert classes == 6 and rows["nearest_word"].mean() == 1 and rows["cos_gap"].mean() > 0.9
    wrong = set_by_hand(small_model(vocab), vocab, [(c + 1) % len(CLASSES) for c in range(len(CLASSES))])  # each at another's word
    rows, _ = reproduce.probe(wrong, vocab, images, scenes, captions, tags=False)
    assert rows["nearest_word"].mean() == 0 and rows["cos_gap"].mean() < 0


def test_bootstrap_resamples_images_not_regions():
    rows = {"image": np.repeat(np.arange(50), 4), "x": np.repeat(np.arange(50) % 2, 4).astype(float)}  # alike within an image
    m, lo, hi = analysis.bootstrap(rows, "x")
    assert m == 0.5 and lo < 0.5 < hi
    assert hi - lo > 0.2  # 50 independent images, not 200 regions: about 2 x 1.96 x 0.5 / sqrt(50) = 0.28
    assert analysis.bootstrap(rows, "x") == (m, lo, hi)  # the same resamples every time


def test_curves_have_a_panel_per_task_and_a_line_per_variant(tmp_path):
    rng = np.random.default_rng(0)
    table = {v: {f: rng.uniform(20, 80, (3, len(reproduce.COLUMNS))) for f in ("1/16", "1/4", "1")} for v in ("Base", "U", "S")}
    size = reproduce.draw_curves(table, ["1/16", "1/4", "1"], tmp_path / "curves.png")
    img = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert img.shape[:2] == (size[1], size[0])
    for v in table:
        colour = reproduce.LINES[reproduce.VARIANTS.index(v)]
        for j in range(4):  # each panel has each variant's colour
            x0, y0 = (j % 2) * size[0] // 2, (j // 2) * (size[1] - 40) // 2
            panel = img[y0:y0 + (size[1] - 40) // 2, x0:x0 + size[0] // 2].reshape(-1, 3)
            assert (panel == colour).all(1).any(), (v, j)


def test_a_whole_reproduction_on_a_tiny_world(tmp_path):
    """main() end to end at a tiny budget: every run in its folder, the table, the probe, the claims,
    the time, both figures; a second call finds everything done and writes the same table."""
    root = make_toy_world(str(tmp_path / "world"), seed=0, scale=0.03)
    argv = ["--toy-root", root, "--out", str(tmp_path / "out"), "--variants", "U", "--fractions", "1/2", "1", "--seeds", "2",
            "--budget", "bert=4", "pretrain=4", "vqa=0.3", "nlvr2=0.3", "retrieval=0.3", "refcoco=0.3"]
    reproduce.main(argv)
    t = json.loads((tmp_path / "out" / "table.json").read_text())
    assert set(t["runs"]) == {"Base", "U"} and t["fractions"] == ["1/2", "1"] and t["seeds"] == [0, 1]
    assert np.array(t["runs"]["U"]["1/2"]).shape == (2, len(reproduce.COLUMNS)) and len(t["interval"]["U"]["1"]) == len(reproduce.COLUMNS)
    assert {"tag_first", "nearest_word", "cos_gap"} <= set(t["probe"]["U"]) and set(t["pretraining"]) == {"Base", "U"}
    assert {c["fraction"] for c in t["claims"]} == {"1/2", "1"} and t["time"]["cpu_min"] > 0
    assert t["compute"]["U"]["pretraining_sequences"] == 4 * 64
    assert set(t["detector"]["probe"]) == {"1", "5", "10", "30", "all"} and 0 < t["detector"]["tag_accuracy"] < 1
    assert set(t["detector"]["tasks"]) == {"vqa", "nlvr2", "flickr30k", "refcoco"}  # the class frequencies
    assert "The toy world's detector (held-out regions): tags right" in (tmp_path / "out" / "table.md").read_text()
    # the probe along pre-training, at the checkpoints it kept (every step at 4 steps) and at its end
    assert [p["step"] for p in t["probe"]["U"]["along"]] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "out" / "pretrain" / "U")).count("ckpt-2.pt") == 1
    assert [c["step"] for c in t["pretraining"]["U"]["curve"]] == [1, 2, 3, 4]
    # rare and common items, beside the trivial baselines; Base against them at each fraction
    by_class = t["by_class"]["U"]["1"]
    assert len(by_class["rare"][0]) == len(reproduce.RARE_COLUMNS) == len(by_class["items"]["common"]) == 4
    assert set(t["base_against_baseline"]) == {"1/2", "1"}
    assert all(set(by_task) == set(reproduce.TASKS) for by_task in t["base_against_baseline"].values())
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.count("| trivial baseline |") == 4 and "Rare and common items" in md and "Base minus the trivial" in md
    assert (tmp_path / "out" / "curves.png").exists() and (tmp_path / "out" / "table.md").exists()
    before = (tmp_path / "out" / "table.md").read_text()
    reproduce.main(argv)
    assert (tmp_path / "out" / "table.md").read_text() == before
    # the folder copied to another machine without its checkpoints, one fine-tuning run short: the
    # pre-trainings run again, to the same weights, the run goes again, and the table is the same
    shutil.copytree(tmp_path / "out", tmp_path / "copy", ignore=shutil.ignore_patterns("*.pt", "*.npz", ".lock"))
    os.remove(tmp_path / "copy" / "finetune" / "U" / "vqa" / "f1" / "seed1" / "results.json")
    copy = [*argv[:3], str(tmp_path / "copy"), *argv[4:]]
    reproduce.main(copy)
    assert (tmp_path / "copy" / "table.md").read_text() == before
    assert (tmp_path / "copy" / "pretrain" / "U" / "ckpt.pt").exists()
    # a pre-training that gives other weights than its fine-tuning runs started from stops the reproduction
    (tmp_path / "copy" / "pretrain" / "U" / "weights.json").write_text(json.dumps({"sha256": "0" * 64}))
    os.remove(tmp_path / "copy" / "pretrain" / "U" / "ckpt.pt")
    with pytest.raises(SystemExit, match="U/weights.json.*finetune/U"):
        reproduce.main(copy)


def test_a_folder_made_on_another_toy_world_stops_the_reproduction(tmp_path, monkeypatch):
    """Runs made on one version of the toy world are not taken as done on another, nor where the version
    is unknown: a new folder is stamped, a folder of another version or with runs and no stamp is refused."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    reproduce.same_world(out)
    assert json.loads((tmp_path / "out" / "world.json").read_text()) == {"toy_version": toy.VERSION}
    reproduce.same_world(out)  # the same version: goes on
    monkeypatch.setattr(toy, "VERSION", toy.VERSION + 1)
    with pytest.raises(SystemExit, match=f"{out}/world.json: its runs read toy world v{toy.VERSION - 1}, this is v{toy.VERSION}"):
        reproduce.same_world(out)
    os.remove(tmp_path / "out" / "world.json")
    os.makedirs(tmp_path / "out" / "finetune")
    with pytest.raises(SystemExit, match=f"{out}: it holds runs but no world.json"):
        reproduce.same_world(out)


def test_a_checkpoint_whose_weights_do_not_fit_is_one_line_naming_it(tmp_path):
    cfg = Config(vocab_size=40, hidden=16, layers=1, heads=2, ffn=32, max_positions=16, feat_dim=8, num_labels=3)
    state = VisualBERT(cfg).state_dict()
    state.pop(next(iter(state)))
    path = tmp_path / "ckpt.pt"
    torch.save({"config": vars(cfg), "model": state, "vocab": ["[PAD]", "[UNK]"]}, path)
    with pytest.raises(SystemExit, match=f"{path}: its weights do not fit the model"):
        reproduce.load_model(str(path))


def test_jobs_follow_the_cores_and_the_free_memory(monkeypatch):
    """--jobs by default: a run per core, as many as the free memory holds at RUN_MEMORY each."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for free_kb, jobs in ((4 * 2**20, 2), (64 * 2**20, 8), (2**19, 1)):  # 4 GiB, 64 GiB, 0.5 GiB free
        monkeypatch.setattr(reproduce, "open", lambda *a, **k: io.StringIO(f"MemTotal: 1 kB\nMemAvailable: {free_kb} kB\n"),
                            raising=False)
        assert reproduce.default_jobs() == jobs


def test_schedule_waits_for_the_pretraining_each_run_needs():
    """By hand: the toy BERT (10 s), then pre-training A (6 s) and B (2 s) from it, then a
    fine-tuning from each (4 s). One worker: 10 + 6 + 2 + 4 + 4 = 26. Two: A and B side by side; B's
    fine-tuning starts at 12 and ends at 16, A's starts at 16 and ends at 20. Three: no faster, since
    A's fine-tuning cannot start before A ends at 16."""
    Run = reproduce.Run
    bert = Run("bert", [], "", "")
    a, b = Run("A", [], "", "", [bert]), Run("B", [], "", "", [bert])
    runs = [bert, a, b, Run("ft A", [], "", "", [a]), Run("ft B", [], "", "", [b])]
    seconds = [10, 6, 2, 4, 4]
    assert [reproduce.schedule(runs, seconds, n) for n in (1, 2, 3)] == [26, 20, 20]
    assert math.isnan(reproduce.schedule(runs, [10, 6, float("nan"), 4, 4], 2))


def test_a_run_done_with_other_settings_than_the_plan_stops_the_reproduction(tmp_path):
    """A folder carried elsewhere keeps its runs; one done at another budget is not read as the plan's."""
    args = reproduce.parser.parse_args(["--out", str(tmp_path / "here"), "--toy-root", "toy", "--variants", "U"])
    args.variants = reproduce.chosen(args)
    run = next(r for r in reproduce.plan(args, dict(reproduce.BUDGET), [0]) if r.argv[0] == "finetune.py")
    elsewhere = ["world" if a == "toy" else a.replace(str(tmp_path / "here"), "out/there") for a in run.argv]
    os.makedirs(run.out)
    storage.write_json(os.path.join(run.out, "args.json"), {"argv": elsewhere + ["--resume"]})
    reproduce.same_settings(run)  # the same run, done in another folder, resumed once
    epochs = elsewhere.index("--epochs") + 1
    storage.write_json(os.path.join(run.out, "args.json"), {"argv": elsewhere[:epochs] + ["9.0"] + elsewhere[epochs + 1:]})
    with pytest.raises(SystemExit, match=f"{run.out}: done as .*--epochs 9.0.*runs as .*--epochs 25.6"):
        reproduce.same_settings(run)
