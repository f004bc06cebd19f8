"""
The analysis of finished runs, for finetune.py's report and reproduce.py: which evaluated items are
rare and which common (docs/METHOD.md section 13), confidence intervals (Student's t over the seeds,
a bootstrap over the images), and Figure 2's 2-D maps of the model's states (PCA, t-SNE) and their
drawing. Nothing here trains or reads a run's files.
"""

import math
import re
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# rare and common items (docs/METHOD.md section 13): is a task learnt on the classes its training set
# seldom names, as well as on those it names often? finetune.py's report splits every metric so.

RARE = 5  # an item is rare when its rarest named class is named by fewer training examples than this


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


IRREGULAR = {"mouse": "mice", "foot": "feet", "tooth": "teeth", "goose": "geese", "person": "people"}


def plurals(name):
    """A class name's plural forms by English's rules: "bus" -> "buses", "knife" -> "knives", "man" -> "men",
    and the irregular ones ("mouse" -> "mice")."""
    forms = {name + "s", name + "es"}
    last = (name.split() or [""])[-1]
    if last in IRREGULAR:
        forms.add(name[: -len(last)] + IRREGULAR[last])
    if name.endswith("y"):
        forms.add(name[:-1] + "ies")
    if name.endswith(("f", "fe")):
        forms.add(name[: -1 if name.endswith("f") else -2] + "ves")
    if name.endswith("man"):
        forms.add(name[:-3] + "men")
    if name.endswith("child"):
        forms.add(name + "ren")
    return forms


class ClassNamer:
    """Which detector classes a text names: a class name or a plural of it as whole words, the longest
    name first ("fire truck" is no "truck"); a name itself wins over another class's plural."""

    def __init__(self, class_names):
        self.forms = {}
        for j, c in enumerate(class_names):
            self.forms.setdefault(tuple(words(c)), j)
        for j, c in enumerate(class_names):
            for form in plurals(c.lower()):
                self.forms.setdefault(tuple(words(form)), j)
        self.forms.pop((), None)
        self.longest = max(map(len, self.forms), default=1)

    def __call__(self, text):
        w, named, t = words(text), set(), 0
        while t < len(w):
            n = next((n for n in range(min(self.longest, len(w) - t), 0, -1) if tuple(w[t:t + n]) in self.forms), 0)
            if n:
                named.add(self.forms[tuple(w[t:t + n])])
            t += max(n, 1)
        return named


def by_class(named_items, named_train, scores):
    """Each metric over the rare and the common items. named_items: per item, the classes its text names;
    named_train: the same per training example; scores: {metric: (N,) per item} ->
    {"rare": {metric: mean, "items": n}, "common": {...}}; an item naming no class is in neither."""
    counts = Counter(j for named in named_train for j in named)
    group = np.array([None if not named else "rare" if min(counts[j] for j in named) < RARE else "common"
                      for named in named_items])
    out = {}
    for g in ("rare", "common"):
        keep = group == g
        out[g] = {**{k: float(np.mean(np.asarray(v)[keep])) if keep.any() else None for k, v in scores.items()},
                  "items": int(keep.sum())}
    return out


# -----------------------------------------------------------------------------
# confidence intervals: over the fine-tuning seeds, and over the held-out images

# Student's t quantile for a two-sided 95% interval, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def interval(x):
    """Mean and 95% t-interval over the seeds (rows of x) -> (mean, low, high), each per column;
    with one seed the interval is NaN: one run says nothing about the spread."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean(0)
    if len(x) < 2:
        return m, np.full_like(m, np.nan), np.full_like(m, np.nan)
    h = T975.get(len(x) - 1, 1.96) * x.std(0, ddof=1) / np.sqrt(len(x))
    return m, m - h, m + h


def seed_interval(x):
    """interval() of one number per seed -> (mean, low, high) as floats."""
    return tuple(float(a[0]) for a in interval(np.asarray(x)[:, None]))


def seeds_needed(x, half_width):
    """The fewest seeds whose 95% t-interval of the mean of x (one number per seed) would be narrower
    than +-half_width, were the seeds to spread as these do; None with one seed, 0 above 31."""
    if len(x) < 2:
        return None
    s = float(np.std(np.asarray(x, dtype=np.float64), ddof=1))
    return next((n for n in range(2, 32) if T975[n - 1] * s / np.sqrt(n) < half_width), 0)


def bootstrap(rows, column, n=1000, seed=0):
    """The column's mean over regions and its 95% interval from resampling the held-out images (a
    region's image is its cluster) with replacement: the same resamples for every model, so the
    intervals of two models' differences can come from subtracting column by column."""
    img = rows["image"].astype(np.int64)
    images = int(img.max()) + 1
    draws = np.random.default_rng(seed).integers(0, images, (n, images))  # (n, images)
    weight = np.stack([np.bincount(d, minlength=images) for d in draws])[:, img]  # (n, regions)
    x = rows[column] if isinstance(column, str) else column
    valid = ~np.isnan(x)  # (b) leaves out regions whose class has too few words
    if not valid.any():
        return float("nan"), float("nan"), float("nan")
    means = (weight * np.where(valid, x, 0)).sum(1) / np.maximum((weight * valid).sum(1), 1)
    return float(x[valid].mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def valid_mean(x):
    """The mean of a probe column over the regions it has a value for (NaN: none)."""
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


# -----------------------------------------------------------------------------
# Figure 2: last-layer representations of words, tags and regions, projected to 2-D and drawn


def pca(x, k=2):
    """The first k principal components of the rows of x (N, D) -> (N, k)."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def tsne(x, perplexity=20.0, steps=600):
    """t-SNE (van der Maaten and Hinton, 2008) of the rows of x (N, D) -> (N, 2): Gaussian neighbour
    probabilities at the given perplexity, Student-t ones in 2-D, KL descent with momentum and
    early exaggeration, started from the PCA map."""
    x = pca(x.double(), min(30, *x.shape))
    n = len(x)
    d2 = torch.cdist(x, x).pow(2)  # (N, N)
    lo, hi = torch.zeros(n, 1, dtype=x.dtype), torch.full((n, 1), math.inf, dtype=x.dtype)
    beta = torch.ones(n, 1, dtype=x.dtype) / d2.mean()
    for _ in range(64):  # bisect each point's precision to reach the perplexity
        p = torch.exp(-d2 * beta).fill_diagonal_(0)
        p = p / p.sum(1, keepdim=True).clamp(min=1e-300)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1, keepdim=True)
        high = entropy > math.log(perplexity)  # too flat: raise the precision
        lo, hi = torch.where(high, beta, lo), torch.where(high, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = (p + p.T) / (2 * n)
    y = pca(x)
    y = y / y[:, 0].std() * 1e-2
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


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 190, 190),
           (240, 50, 230), (128, 128, 0)]
PANEL, LEGEND = 400, 70  # pixels: each square panel, the legend strip below


def draw_figure(panels, classes, path):
    """panels: [(title, points (N, 2), class index (N,), modality (N,))] -> a PNG with one square
    panel each, side by side: colour by class, marker by modality (word o, tag square, region ^)."""
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
