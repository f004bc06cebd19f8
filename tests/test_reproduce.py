"""reproduce.py: the table and the claims on a made-up result set, the projections on points of
known structure, and Figure 2's picture."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reproduce  # noqa: E402


def write_results(out, variant, seed, acc):
    """Results files as finetune.py writes them, every metric of a run equal to `acc`."""
    results = {"vqa": {"val": {"accuracy": acc}}, "nlvr2": {"dev": {"accuracy": acc, "consistency": 0.1}, "test1": {"accuracy": acc}},
               "retrieval": {"test": {"R@1": acc, "R@5": acc, "R@10": acc}},
               "refcoco": {s: {"accuracy": acc} for s in ("val", "testA", "testB")}}
    for task, res in results.items():
        os.makedirs(out / f"seed{seed}" / variant / task)
        (out / f"seed{seed}" / variant / task / "results.json").write_text(json.dumps({"task": task, **res}))


def test_table_means_stds_and_claims_from_results_files(tmp_path):
    accs = {"Base": [0.50, 0.52, 0.54], "U": [0.60, 0.62, 0.64], "U_NT": [0.50, 0.52, 0.54],
            "S": [0.60, 0.61, 0.65], "S_NT": [0.58, 0.60, 0.62], "U_NC": [0.70, 0.72, 0.74]}
    for v, runs in accs.items():
        for seed, a in enumerate(runs):
            write_results(tmp_path, v, seed, a)
    table = reproduce.collect(str(tmp_path), list(accs), [0, 1, 2])
    assert table["U"].shape == (3, len(reproduce.COLUMNS))
    assert np.allclose(table["U"][:, 0], [60, 62, 64]) and np.allclose(table["S"][2], 65)
    md = reproduce.markdown(table)
    assert "| U | 62.0 ± 2.0 (70.7) |" in md  # mean, sample std (ddof 1), the paper's VQA number
    assert md.count("\n|") == 2 + len(accs)  # header, rule, one row per variant
    verdicts = {c: (ok, why) for c, ok, why in reproduce.claims(table)}
    assert verdicts["U beats Base everywhere"][0] is True  # +10 on every column
    assert "9 of 9" in verdicts["U beats Base everywhere"][1]
    # S - U is +0 outside retrieval and +0 on it: close, but S is not ahead on retrieval
    assert verdicts["U comes close to S except on retrieval"][0] is False
    assert verdicts["tags matter more without aligned data"][0] is True  # U - U_NT 10 > S - S_NT 2
    assert verdicts["U_NC (no captions) stays close to U"][0] is False  # 10 points apart, noise 2 * std = 4


def test_missing_result_is_a_clear_error(tmp_path):
    write_results(tmp_path, "U", 0, 0.5)
    os.remove(tmp_path / "seed0" / "U" / "vqa" / "results.json")
    with pytest.raises(FileNotFoundError, match="seed0/U/vqa/results.json"):
        reproduce.collect(str(tmp_path), ["U"], [0])


def test_pca_recovers_a_plane_embedded_in_higher_dimensions():
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(200, 2, generator=g) * torch.tensor([5.0, 2.0])  # (N, 2), the larger spread first
    basis, _ = torch.linalg.qr(torch.randn(10, 2, generator=g))  # (10, 2) orthonormal
    x = (plane @ basis.T + 3.0).double()  # (N, 10), shifted
    y = reproduce.pca(x)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(plane.double(), plane.double()), atol=1e-6)  # same distances: a rotation of the plane
    assert y[:, 0].var() > y[:, 1].var()


def test_tsne_keeps_clusters_apart():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 20, generator=g) * 6
    labels = torch.arange(4).repeat_interleave(40)
    x = centres[labels] + torch.randn(160, 20, generator=g)  # 4 clusters in 20-D
    y = reproduce.tsne(x, perplexity=15, steps=300)
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
    size = reproduce.draw_figure(panels, classes, tmp_path / "figure2.png")
    img = Image.open(tmp_path / "figure2.png").convert("RGB")
    assert img.size == size == (3 * reproduce.PANEL, reproduce.PANEL + reproduce.LEGEND)
    pixels = np.asarray(img)
    for j in range(3):
        panel = pixels[: reproduce.PANEL, j * reproduce.PANEL:(j + 1) * reproduce.PANEL].reshape(-1, 3)
        present = {tuple(c) for c in panel}
        for k in range(3):
            assert reproduce.PALETTE[k] in present  # every class is drawn in every panel
    assert reproduce.PALETTE[3] not in {tuple(c) for c in pixels.reshape(-1, 3)}  # no fourth class


def test_plan_runs_each_variant_from_the_same_bert_with_the_same_budget(tmp_path):
    args = reproduce.p.parse_args(["--out", str(tmp_path), "--toy-root", "toy"])
    runs = reproduce.plan(args, dict(reproduce.BUDGET), [0, 1])
    pre = [r for r in runs if r.argv[0] == "pretrain.py" and "--text-only" not in r.argv]
    assert len(pre) == 2 * (len(reproduce.VARIANTS) - 1)
    assert all(r.argv[r.argv.index("--init-from") + 1] == f"{tmp_path}/bert/ckpt.pt" for r in pre)
    assert {r.argv[r.argv.index("--max-steps") + 1] for r in pre} == {str(reproduce.BUDGET["pretrain"])}
    ft = [r for r in runs if r.argv[0] == "finetune.py"]
    assert len(ft) == 2 * len(reproduce.VARIANTS) * 4
    base = [r for r in ft if "/Base/" in r.out]
    assert all(r.argv[r.argv.index("--init-from") + 1] == f"{tmp_path}/bert/ckpt.pt" for r in base)
    assert all(("--no-tags" in r.argv) == ("_NT" in r.out) for r in ft)
