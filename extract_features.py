"""
Region features and tags from real images with torchvision's Faster R-CNN (docs/METHOD.md §9), written to the
feature store (storage.FeatureStore) that pre-training and fine-tuning read; or an import of the classic
bottom-up-attention TSV (docs/METHOD.md §7) into the same store.

    python extract_features.py --images path/to/images --out features/cc     # a folder, or a list file of paths
    python extract_features.py --images imgs --out feats/refcoco --given-boxes boxes.json
    python extract_features.py --from-tsv train.tsv --vocab objects.txt --attr-vocab attributes.txt --out feats/vg
    python extract_features.py --bench --weights none --min-size 320 --max-size 512

Images: *.jpg, *.jpeg, *.png, *.webp, *.bmp under --images (recursive), or the paths of a list file
(one a line, relative to the list file's folder). Image id = file stem ("COCO_val2014_000000000042.jpg"
-> "COCO_val2014_000000000042"); two files with one stem stop the run at start. Pixels: EXIF orientation
applied, 16-bit scaled to 8-bit, alpha composited on white, CMYK/palette/grayscale converted to RGB;
an image whose longer side exceeds 4 x --max-size is first shrunk by an integer factor (PIL reduce).
Then torchvision's own transform: shorter side to --min-size, longer at most --max-size, ImageNet norm.

Box policy (kept in store.meta["extractor"] with every other setting):
  1. candidates: each RPN proposal with its best foreground class, that class's regressed box and softmax
     score; boxes clipped to the image, empty ones dropped;
  2. class-agnostic NMS over the candidates at --nms IoU;
  3. fixed (--boxes K, default 36): the K best survivors by score, whatever the score; adaptive
     (--min-boxes/--max-boxes): the survivors scoring >= --score-thresh, at least min, at most max;
  4. fewer survivors than wanted: the best boxes NMS suppressed fill in, by score; fewer proposals than
     wanted (tiny, blank images): the whole-image box pads the rest, tagged by the detector's classifier.
Features: the final boxes pooled again from the same backbone pass (never a second one): `box_head`
(1024-d, the model's MultiScaleRoIAlign + box head) or `c5` (2048-d, RoIAlign 7x7 on the last ResNet
stage, averaged). Tag = label id into store.class_names (torchvision's 91 COCO ids), score = its prob.
--given-boxes FILE: JSON {image id or file name: [[x1, y1, x2, y2], ...] pixel boxes}: only those images,
those boxes (clipped to the image), each tagged by the detector's classifier on its box-head feature.
Batching pads images to a common size, which touches features near borders a little; a rerun keeps the
batches an uninterrupted run would have, so it writes the same numbers.

Resuming: rerun the same command after a kill; stored images are not redone, a shard of --shard-size
images is the most a kill loses. A store refuses a run with other settings (model, weights, box policy,
sizes, feature, dtype): write those to a new folder. Sharding: --shard i --num-shards n (or torchrun's
RANK/WORLD_SIZE): process i takes images i, i+n, ... and writes shard{i}-*; the store reads all as one.
Bad files (empty, truncated, not an image, unknown format) are skipped and listed once in
OUT/skipped.txt as "path<TAB>reason"; the run goes on and reports how many. Delete a line to retry a file.
A malformed TSV row is skipped and listed there too ("TSV row N<TAB>reason"); more than storage.MAX_BAD_SHARE
of the rows bad stops the import (the good ones stay in the store).
"""

import argparse
import base64
import contextlib
import csv
import hashlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torchvision.ops import boxes as box_ops, roi_align

import guards
import storage

Image.MAX_IMAGE_PIXELS = None  # very large scans and panoramas are legitimate images here, not bombs
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# -----------------------------------------------------------------------------
# settings: `python extract_features.py -h` is the manual
parser = guards.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--images", help="folder of images (searched recursively) or a text file of image paths")
parser.add_argument("--out", help="the feature store folder to write (resumed if it exists)")
parser.add_argument("--weights", default="DEFAULT",
                    help="DEFAULT (torchvision's COCO weights, downloaded once), a weights enum name, "
                         "none (random, seeded by --seed: for tests and offline machines), or a local .pth state dict")
parser.add_argument("--model", default="fasterrcnn_resnet50_fpn_v2", help="torchvision Faster R-CNN with FPN "
                    "(fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_fpn)")
parser.add_argument("--feature", default="box_head", choices=["box_head", "c5"],
                    help="1024-d box head, or the last ResNet stage averaged (2048-d)")
parser.add_argument("--boxes", type=guards.POSITIVE_INT, default=None,
                    help="fixed number of boxes per image (default 36)")
parser.add_argument("--min-boxes", type=guards.POSITIVE_INT, default=None,
                    help="adaptive: at least this many boxes (default 10)")
parser.add_argument("--max-boxes", type=guards.POSITIVE_INT, default=None,
                    help="adaptive: at most this many boxes (default 100)")
parser.add_argument("--score-thresh", type=guards.SHARE, default=0.2,
                    help="adaptive: keep boxes scoring at least this (%(default)s)")
parser.add_argument("--nms", type=guards.POSITIVE, default=0.3, help="IoU of the class-agnostic NMS (%(default)s)")
parser.add_argument("--proposals", type=guards.POSITIVE_INT, default=1000,
                    help="RPN proposals per image (%(default)s, torchvision's; fewer are faster: see "
                         "--bench-proposals)")
parser.add_argument("--min-size", type=guards.POSITIVE_INT, default=800,
                    help="resize the shorter side to this (%(default)s, torchvision's)")
parser.add_argument("--max-size", type=guards.POSITIVE_INT, default=1333,
                    help="... unless the longer side would exceed this (%(default)s)")
parser.add_argument("--given-boxes", default=None,
                    help="JSON {image id or file name: [[x1, y1, x2, y2], ...]} pixel boxes to pool")
parser.add_argument("--from-tsv", default=None,
                    help="import a bottom-up-attention TSV (docs/METHOD.md §7) instead of running a detector")
parser.add_argument("--vocab", default=None,
                    help="TSV import: object class names, one a line (first synonym); else class_<i>")
parser.add_argument("--attr-vocab", default=None, help="TSV import: attribute names, one a line; else attr_<i>")
parser.add_argument("--batch-size", type=guards.POSITIVE_INT, default=4, help="images per detector batch (%(default)s)")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
parser.add_argument("--workers", type=guards.COUNT, default=min(4, CORES - 1),
                    help="image-decoding processes (default: one fewer than this machine's cores, at most 4: "
                         "%(default)s)")
parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype; auto: fp16 on CUDA, fp32 on CPU")
parser.add_argument("--seed", type=int, default=0, help="seed of the random detector with --weights none (%(default)s)")
parser.add_argument("--shard", type=guards.COUNT, default=None,
                    help="this process's share (default: torchrun's RANK, else 0)")
parser.add_argument("--num-shards", type=guards.POSITIVE_INT, default=None,
                    help="number of processes sharing the job (default: WORLD_SIZE, else 1)")
parser.add_argument("--shard-size", type=guards.POSITIVE_INT, default=1000,
                    help="images per written shard, the most a kill can lose (%(default)s)")
parser.add_argument("--bench", action="store_true",
                    help="images/s of extraction vs torchvision's plain model(images), nothing written")
parser.add_argument("--bench-images", type=guards.POSITIVE_INT, default=16,
                    help="--bench: images to time, the first of --images, else random ones (%(default)s)")
parser.add_argument("--bench-proposals", type=guards.POSITIVE_INT, nargs="+", metavar="N",
                    help="--bench: at each of these proposal counts, and how many of the boxes kept with the first "
                         "are kept with each other")
# every flag that names a path, and what it must be (guards.check_path); --weights is checked where it is read
PATH_FLAGS = {"images": "file or folder", "out": "out", "given_boxes": "file", "from_tsv": "file", "vocab": "file",
              "attr_vocab": "file"}

# -----------------------------------------------------------------------------
# images: find, decode to upright 8-bit RGB


def find_images(spec):
    """A folder (searched recursively) or a list file -> sorted paths; none is an error."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.lower().endswith(EXTENSIONS))
        if not paths:
            sys.exit(f"--images {spec}: no images in this folder ({', '.join(EXTENSIONS)})")
        return paths
    if spec.lower().endswith(EXTENSIONS):
        sys.exit(f"--images {spec}: an image; --images takes a folder of images or a text file listing them")
    try:
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        sys.exit(f"--images {spec}: not a text file listing image paths, one a line")
    if not lines:
        sys.exit(f"--images {spec}: lists no images")
    return [os.path.join(os.path.dirname(os.path.abspath(spec)), p) for p in lines]


def read_given_boxes(file):
    """--given-boxes: {image id or file name: [[x1, y1, x2, y2], ...]} in pixels, checked before any work."""
    try:
        given = storage.read_json(file)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    if not isinstance(given, dict):
        sys.exit(f"--given-boxes {file}: not a JSON object {{image id or file name: [[x1, y1, x2, y2], ...]}}")
    box = lambda b: isinstance(b, list) and len(b) == 4 and all(type(v) in (int, float) for v in b)  # noqa: E731
    for k, boxes in given.items():
        if not isinstance(boxes, list) or not all(map(box, boxes)):
            sys.exit(f"--given-boxes {file}: image {k!r}: not a list of [x1, y1, x2, y2] pixel boxes")
    return {str(k): v for k, v in given.items()}


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def image_ids(paths):
    """Image id = file stem; two files with one stem are an error, not a silent overwrite."""
    seen = {}
    for p in paths:
        if stem(p) in seen:
            sys.exit(f"error: {seen[stem(p)]} and {p} both have image id {stem(p)!r} (the file stem); "
                     "rename or leave out one")
        seen[stem(p)] = p
    return list(seen)


def load_image(path, max_side):
    """Any image file -> ((3, H, W) uint8 RGB tensor, width, height of the upright original)."""
    with Image.open(path) as img:
        img.load()  # a truncated file fails here, not later
        img = ImageOps.exif_transpose(img)  # EXIF-rotated photos upright
    width, height = img.size
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16/32-bit: scale to 8 bits, PIL's convert would clip
        a = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # alpha on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ... -> RGB
    if max(width, height) > max_side:  # very large: shrink by an integer factor first (memory, speed)
        img = img.reduce(math.ceil(max(width, height) / max_side))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1), width, height  # (3, H, W)


class Batches(torch.utils.data.Dataset):
    """Item i = the decoded images of batch i, decoded in DataLoader workers; bad files carry their error."""

    def __init__(self, batches, max_side):
        self.batches, self.max_side = batches, max_side

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        out = []
        for path in self.batches[i]:
            try:
                out.append((path, *load_image(path, self.max_side), None))
            except Exception as e:  # zero bytes, truncated, not an image, unknown format, ...
                out.append((path, None, 0, 0, f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")))
        return out

# -----------------------------------------------------------------------------
# the detector and the feature gathering


def build_model(args):
    """torchvision Faster R-CNN + the class names of its label ids + a string that names the weights."""
    kw = dict(min_size=args.min_size, max_size=args.max_size, rpn_post_nms_top_n_test=args.proposals,
              box_score_thresh=args.score_thresh, box_nms_thresh=args.nms, box_detections_per_img=args.max_k)
    categories = torchvision.models.get_model_weights(args.model).DEFAULT.meta["categories"]  # 91 COCO ids, offline
    weights_file = os.path.isfile(args.weights) or args.weights.endswith((".pth", ".pt")) or os.sep in args.weights
    if args.weights.lower() == "none":
        torch.manual_seed(args.seed)  # the same random detector in every process and rerun
        model = torchvision.models.get_model(args.model, weights=None, weights_backbone=None, **kw)
        name = f"none (random, seed {args.seed})"
    elif weights_file:
        guards.check_path(args.weights, "file", "--weights")
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            state = state.get("model", state)  # torchvision's reference scripts save {"model": ...}
            num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
            model = torchvision.models.get_model(args.model, weights=None, weights_backbone=None,
                                                 num_classes=num_classes, **kw)
            model.load_state_dict(state)
        except Exception as e:  # not a torch file, not a state dict, another model's
            first = (str(e).splitlines() or [""])[0][:200]
            sys.exit(f"--weights {args.weights}: not a state dict of {args.model} ({type(e).__name__}: {first})")
        with open(args.weights, "rb") as f:
            name = f"{os.path.basename(args.weights)} sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}"
        categories = categories if num_classes == len(categories) else [f"class_{i}" for i in range(num_classes)]
    else:  # DEFAULT or an enum name: torchvision downloads the file once, on a machine with internet
        try:
            torchvision.models.get_model_weights(args.model).verify(args.weights)
        except (ValueError, KeyError):
            sys.exit(f"--weights {args.weights}: not a file, nor a name of {args.model}'s weights in torchvision "
                     f"({', '.join(torchvision.models.get_model_weights(args.model).__members__)}), nor none")
        try:
            model = torchvision.models.get_model(args.model, weights=args.weights, **kw)
        except OSError as e:  # offline: no cached file and no internet
            sys.exit(f"could not get torchvision's {args.weights} weights for {args.model} ({e}); "
                     "copy the .pth into the torch hub cache, or pass --weights PATH or --weights none")
        name = str(torchvision.models.get_model_weights(args.model).verify(args.weights))
    return model.eval(), categories, name


def box_policy(args):
    """Fixed K, or adaptive min..max: fills in args.adaptive, the box counts and args.max_k; returns the
    policy's name as the store records it (ask.py reads it back)."""
    if args.min_boxes is None and args.max_boxes is None:
        args.adaptive, args.boxes = False, 36 if args.boxes is None else args.boxes
        args.max_k = args.boxes
        return f"fixed {args.boxes}"
    args.adaptive = True
    args.min_boxes = 10 if args.min_boxes is None else args.min_boxes
    args.max_boxes = 100 if args.max_boxes is None else args.max_boxes
    args.max_k = args.max_boxes
    return f"adaptive {args.min_boxes}-{args.max_boxes} at score >= {args.score_thresh}"


def feature_dim(model, kind):
    if kind == "c5":
        return model.backbone.fpn.inner_blocks[-1][0].in_channels
    return model.roi_heads.box_predictor.cls_score.in_features


def select_boxes(boxes, scores, args):
    """The box policy on one image's candidates, (P, 4) boxes and (P,) scores -> indices, best first."""
    keep = box_ops.nms(boxes, scores, args.nms)  # (k,) survivors, sorted by score
    n = args.boxes if not args.adaptive else min(max(int((scores[keep] >= args.score_thresh).sum()), args.min_boxes),
                                                 args.max_boxes)
    if len(keep) < n:  # too few survive NMS: the best suppressed boxes fill in
        suppressed = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        suppressed[keep] = False
        rest = suppressed.nonzero()[:, 0]
        keep = torch.cat([keep, rest[scores[rest].argsort(descending=True)]])
    return keep[:n], n


@torch.inference_mode()
def extract(model, images, args, given=None):
    """images: list of (3, H, W) float in [0, 1]; given: None or a list of (n_i, 4) boxes normalised to [0, 1].
    Returns per image a dict of features (K, D), boxes (K, 4) normalised, labels (K,), scores (K,)."""
    rh = model.roi_heads
    batch, _ = model.transform(images)  # resized, ImageNet-normalised, padded: tensors (B, 3, H', W')
    sizes = batch.image_sizes  # [(h', w')] of each resized image inside the padding
    scale = [torch.tensor([w, h, w, h], dtype=torch.float32, device=batch.tensors.device) for h, w in sizes]
    body = model.backbone.body(batch.tensors)  # ResNet stages, the last (B, 2048, H'/32, W'/32)
    fpn = model.backbone.fpn(body)  # FPN levels, each (B, 256, ., .): the backbone runs once
    pad = [0] * len(images)  # how many whole-image boxes pad each image
    if given is None:
        proposals, _ = model.rpn(batch, fpn)  # [(P_i, 4)] in resized pixels
        x = rh.box_head(rh.box_roi_pool(fpn, proposals, sizes))  # (sum P, 1024)
        logits, deltas = rh.box_predictor(x)  # (sum P, C), (sum P, 4C)
        probs = F.softmax(logits.float(), -1)
        s_all, lab_all = probs[:, 1:].max(1)  # best foreground class per proposal, (sum P,)
        lab_all = lab_all + 1  # label ids count the background as 0
        # (sum P, 4)
        d = deltas.float().reshape(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), lab_all]
        b_all = rh.box_coder.decode_single(d, torch.cat(proposals).float())  # (sum P, 4) that class's regressed box
        final, labels, scores, counts = [], [], [], [len(q) for q in proposals]
        for i, (b, s, lab) in enumerate(zip(b_all.split(counts), s_all.split(counts), lab_all.split(counts))):
            b = box_ops.clip_boxes_to_image(b, sizes[i])  # (P_i, 4)
            ok = ((b[:, 2] - b[:, 0]) > 1e-2) & ((b[:, 3] - b[:, 1]) > 1e-2)  # no empty boxes
            b, s, lab = b[ok], s[ok], lab[ok]
            keep, n = select_boxes(b, s, args)
            pad[i] = n - len(keep)
            whole = torch.tensor([[0.0, 0.0, sizes[i][1], sizes[i][0]]], device=b.device).expand(pad[i], 4)
            final.append(torch.cat([b[keep], whole]))
            labels.append(lab[keep])
            scores.append(s[keep])
    else:  # boxes someone else chose: normalised -> resized pixels
        final = [g.clamp(0, 1) * scale[i] for i, g in enumerate(given)]
    tag = given is not None or any(pad)  # boxes the detector did not tag: its classifier tags them
    if args.feature == "box_head" or tag:
        x = rh.box_head(rh.box_roi_pool(fpn, final, sizes))  # (sum K, 1024) the final boxes pooled again
    if args.feature == "c5":  # the last ResNet stage, RoIAlign 7x7 then averaged: (sum K, 2048)
        c5 = list(body.values())[-1]
        feats = roi_align(c5, final, output_size=7, spatial_scale=c5.shape[-1] / batch.tensors.shape[-1],
                          sampling_ratio=2).mean((2, 3))
    else:
        feats = x
    if tag:
        probs = F.softmax(rh.box_predictor(x)[0].float(), -1).split([len(b) for b in final])  # [(K_i, C)]
        tags = [(p[:, 1:].max(1)[0], p[:, 1:].max(1)[1] + 1) for p in probs]  # (score, label id) per box
    out = []
    for i, (f, b) in enumerate(zip(feats.split([len(b) for b in final]), final)):
        if given is not None:
            s, lab = tags[i]
        else:  # detections keep the detector's tag, padding boxes get the classifier's
            s, lab = scores[i], labels[i]
            if pad[i]:
                s, lab = torch.cat([s, tags[i][0][-pad[i]:]]), torch.cat([lab, tags[i][1][-pad[i]:]])
        out.append({"features": f.float().cpu().numpy(), "boxes": (b / scale[i]).clamp(0, 1).float().cpu().numpy(),
                    "labels": lab.cpu().numpy(), "scores": s.float().cpu().numpy()})
    return out


def open_store(args, rank, dim, class_names, settings, attr_names=None):
    """This process's writer of the store --out; a store made with other settings stops the run."""
    try:
        return storage.FeatureWriter(args.out, dim, class_names, attr_names, extractor=settings,
                                     prefix=f"shard{rank}", shard_size=args.shard_size)
    except ValueError as e:  # other settings, a broken meta.json
        sys.exit(str(e))

# -----------------------------------------------------------------------------
# the bottom-up-attention TSV (docs/METHOD.md §7)

TSV_FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
              "features"]


def read_vocab(file, n, prefix):
    """One class a line, first synonym of "a,b,c"; no file: n names prefix_<i> (Visual Genome's sizes)."""
    if file is None:
        return [f"{prefix}_{i}" for i in range(n)]
    try:
        with open(file, encoding="utf-8") as f:
            names = [line.strip().split(",")[0] for line in f if line.strip()]
    except UnicodeDecodeError:
        names = []
    if not names:
        sys.exit(f"{file}: not a list of names, one a line")
    return names


def import_tsv(args, rank, world):
    csv.field_size_limit(sys.maxsize)  # a row holds num_boxes x 2048 floats in base64
    names, attr_names = read_vocab(args.vocab, 1600, "class"), read_vocab(args.attr_vocab, 400, "attr")
    if args.vocab is None:
        print("no --vocab: class names are class_<i> (1600 Visual Genome objects); attributes attr_<i> (400)")
    settings = {"source": "bottom-up-attention TSV", "tsv": os.path.basename(args.from_tsv),
                "vocab": args.vocab and os.path.basename(args.vocab),
                "attr_vocab": args.attr_vocab and os.path.basename(args.attr_vocab),
                "boxes": "as in the TSV, normalised by img_w, img_h"}
    writer, done, n, rows, mine, bad = None, set(), 0, 0, 0, []
    decode = lambda s, dtype: np.frombuffer(base64.b64decode(s, validate=True), dtype=dtype)  # noqa: E731
    with open(args.from_tsv, encoding="utf-8", errors="replace") as f:
        for r, row in enumerate(csv.DictReader(f, TSV_FIELDS, delimiter="\t")):
            rows += 1
            if r % world != rank:
                continue
            mine += 1
            try:
                K = int(row["num_boxes"])
                w, h = int(float(row["img_w"])), int(float(row["img_h"]))
                feats = decode(row["features"], np.float32).reshape(K, -1)  # (K, 2048)
                labels, attrs = decode(row["objects_id"], np.int64), decode(row["attrs_id"], np.int64)
                boxes = decode(row["boxes"], np.float32).reshape(K, 4) / np.array([w, h, w, h], np.float32)  # (K, 4)
                conf, attr_conf = decode(row["objects_conf"], np.float32), decode(row["attrs_conf"], np.float32)
                if not len(labels) == len(attrs) == len(conf) == len(attr_conf) == K or feats.shape[1] == 0:
                    raise ValueError(f"{K} boxes, {len(labels)} classes, {len(conf)} scores, {len(attrs)} attributes")
            except (ValueError, TypeError) as e:  # a missing field is None: TypeError
                why = f"not a bottom-up-attention TSV row ({', '.join(TSV_FIELDS)}): {type(e).__name__}: {str(e)[:200]}"
                bad.append((r + 1, why.replace("\n", " ").replace("\t", " ")))
                continue
            if labels.size and (labels.max() >= len(names) or attrs.max() >= len(attr_names)):
                sys.exit(f"{args.from_tsv}: image {row['img_id']} has class ids beyond the vocabulary "
                         f"({len(names)}, {len(attr_names)})")
            if writer is None:
                writer = open_store(args, rank, feats.shape[1], names, settings, attr_names)
                done = writer.done_ids()
            if row["img_id"] in done:
                continue
            try:
                writer.add(row["img_id"], feats, np.clip(boxes, 0, 1), labels, conf, w, h, attrs, attr_conf)
            except storage.NonFinite as e:  # never written: skipped and listed as a bad row
                bad.append((r + 1, str(e)))
                continue
            n += 1
    if not rows:
        sys.exit(f"{args.from_tsv}: no rows")
    if writer is not None:  # the good rows are kept, the bad listed, even when they are too many
        writer.close()
        skipped_file = os.path.join(args.out, "skipped.txt")
        list_bad([(f"{args.from_tsv} row {r}", why) for r, why in bad], read_skipped(skipped_file), skipped_file)
    if bad:  # a share of this process's rows; with no good row at all, nothing was written
        try:
            storage.check_bad_share(len(bad), mine, f"{args.from_tsv}: row {bad[0][0]} is {bad[0][1]}", "rows")
        except ValueError as e:
            sys.exit(str(e))
    print(f"imported {n} images from {args.from_tsv} into {args.out}"
          + (f"; skipped {len(bad)} bad rows, listed in {skipped_file}" if bad else ""))

# -----------------------------------------------------------------------------
# main: settings, the work list, the loop


def parse_args(argv):
    """The settings, checked before any work, and this process's shard (rank) of `world`."""
    args = parser.parse_args(argv)
    rank = args.shard if args.shard is not None else int(os.environ.get("RANK", 0))
    world = args.num_shards if args.num_shards is not None else int(os.environ.get("WORLD_SIZE", 1))
    if rank >= world:
        sys.exit(f"--shard {rank}: the shards are numbered 0 to {world - 1} (--num-shards {world})")
    if not 0 <= rank < world:
        parser.error(f"--shard {rank} is not in [0, --num-shards {world})")
    guards.check_paths(args, PATH_FLAGS)
    if args.from_tsv:
        if not args.out:
            parser.error("--out is required")
    elif not (args.bench or (args.images and args.out)):
        parser.error("--images and --out are required (or --from-tsv, or --bench)")
    elif args.boxes is not None and (args.min_boxes is not None or args.max_boxes is not None):
        parser.error("choose --boxes K (fixed) or --min-boxes/--max-boxes (adaptive), not both")
    return args, rank, world


def pick_device(args):
    """--device and --dtype made concrete (auto: this process's GPU, fp16 on it); the autocast context."""
    if args.device == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "fp16" if device.type == "cuda" else "fp32"
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    return device, torch.autocast(device.type, half) if half else contextlib.nullcontext()


def store_settings(args, policy, weights_name):
    """How the features are made, as store.meta["extractor"] keeps it: a store refuses other settings."""
    return {"extractor": "extract_features.py", "model": args.model, "weights": weights_name,
            "torchvision": torchvision.__version__.split("+")[0], "feature": args.feature,
            "box_policy": "given boxes" if args.given_boxes else policy, "nms": args.nms,
            "score_thresh": args.score_thresh,
            "candidates": "best foreground class per proposal, class-agnostic NMS, best first",
            "fill": "best NMS-suppressed boxes, then the whole-image box", "proposals": args.proposals,
            "image_size": f"shorter side {args.min_size}, longer at most {args.max_size} (torchvision transform); "
            f"longer than {4 * args.max_size} first reduced by an integer factor",
            "pixels": "RGB, EXIF-transposed, alpha on white, 16-bit scaled", "dtype": args.dtype,
            "given_boxes": args.given_boxes and os.path.basename(args.given_boxes)}


def read_skipped(file):
    """The paths OUT/skipped.txt lists; a line a kill cut short has no reason, so its file is tried again."""
    if not os.path.exists(file):
        return set()
    with open(file) as f:
        text = f.read()
    if text and not text.endswith("\n"):
        with open(file, "a") as f:
            f.write("\n")
    return {line.split("\t")[0] for line in text.splitlines() if "\t" in line}


def list_bad(bad, listed, file):
    """Each (path, reason) of `bad` (files, or TSV rows) added to `file` once, however often the job is rerun;
    returns how many are bad."""
    for path, reason in bad:
        if path not in listed:
            with open(file, "a") as f:
                f.write(f"{path}\t{reason}\n")
            listed.add(path)
    return len(bad)


def write_batch(model, good, args, device, autocast, given, writer, done):
    """Extract the decoded images `good` and write those not done yet; returns how many were written, and
    (path, reason) of each left out for non-finite features (never written)."""
    images = [t.to(device, non_blocking=True).float() / 255 for _, t, _, _, _ in good]  # (3, H, W) in [0, 1]
    boxes = None
    if given is not None:  # pixel boxes of the original -> normalised
        boxes = []
        for path, _, w, h, _ in good:
            b = given.get(stem(path), given.get(os.path.basename(path)))
            size = torch.tensor([w, h, w, h], device=device)
            boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4).to(device) / size)
    with autocast:
        outs = extract(model, images, args, boxes)
    written, bad = 0, []
    for (path, _, w, h, _), o in zip(good, outs):
        if stem(path) not in done:  # a rerun recomputes a part-done batch but writes only what is missing
            try:
                writer.add(stem(path), o["features"], o["boxes"], o["labels"], o["scores"], w, h)
                written += 1
            except storage.NonFinite as e:
                bad.append((path, str(e)))
    return written, bad


def main(argv=None):
    args, rank, world = parse_args(argv)
    try:
        return import_tsv(args, rank, world) if args.from_tsv else extract_all(args, rank, world)
    except storage.WriteError as e:  # a full disk: the shards written before it are whole, and a rerun keeps them
        sys.exit(f"{e}; the images of the complete shards in {args.out} are kept, and the same command goes on")


def extract_all(args, rank, world):
    """Every image of --images not done yet, into this process's shards of --out."""
    policy = box_policy(args)
    device, autocast = pick_device(args)
    paths = find_images(args.images) if args.images else []
    ids = image_ids(paths)  # fails at start on two files with one stem
    given = read_given_boxes(args.given_boxes) if args.given_boxes and not args.bench else None
    model, categories, weights_name = build_model(args)
    model.to(device)
    dim = feature_dim(model, args.feature)
    settings = store_settings(args, policy, weights_name)
    print(f"{args.model}, weights {weights_name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{device} {args.dtype}; boxes {settings['box_policy']}, nms {args.nms}, {args.feature} features {dim}-d")
    if args.bench:
        return bench(model, paths, args, device, autocast)

    if given is not None:
        keep = [i for i, (p, k) in enumerate(zip(paths, ids)) if k in given or os.path.basename(p) in given]
        print(f"--given-boxes: {len(keep)} of {len(paths)} images have boxes; the others are left out")
        paths, ids = [paths[i] for i in keep], [ids[i] for i in keep]
    writer = open_store(args, rank, dim, categories, settings)
    done = writer.done_ids()
    skipped_file = os.path.join(args.out, "skipped.txt")
    listed = read_skipped(skipped_file)
    # this process's share, in fixed batches: a rerun loads only batches with work left, batched as before
    mine = list(zip(paths, ids))[rank::world]
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    batches = [[p for p, _ in b] for b in batches if any(k not in done and p not in listed for p, k in b)]
    todo = {p for b in batches for p in b if stem(p) not in done and p not in listed}
    print(f"{len(paths)} images, {len(mine)} in shard {rank}/{world}, {len(mine) - len(todo)} already done or skipped, "
          f"{len(todo)} to go")

    loader = torch.utils.data.DataLoader(Batches(batches, 4 * args.max_size), batch_size=None, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    handled, written, bad, t0, last = 0, 0, 0, time.time(), 0.0
    for batch in loader:
        handled += sum(path in todo for path, *_ in batch)
        bad += list_bad([(path, reason) for path, _, _, _, reason in batch if reason is not None], listed, skipped_file)
        good = [b for b in batch if b[4] is None]
        if good:
            n, non_finite = write_batch(model, good, args, device, autocast, given, writer, done)
            written, bad = written + n, bad + list_bad(non_finite, listed, skipped_file)
        if time.time() - last > 5:  # progress line, every 5 s
            last, rate = time.time(), handled / max(time.time() - t0, 1e-9)
            eta = (len(todo) - handled) / max(rate, 1e-9)
            print(f"[shard {rank}] {handled}/{len(todo)} images | {rate:.2f} images/s | ETA {eta / 60:.1f} min | "
                  f"{bad} skipped", flush=True)
    writer.close()
    rate = handled / max(time.time() - t0, 1e-9)
    print(f"[shard {rank}] done: {written} images written to {args.out} ({rate:.2f} images/s), "
          f"{bad} skipped" + (f" (listed in {skipped_file})" if bad else ""))


@torch.inference_mode()
def bench(model, paths, args, device, autocast):
    """Images/s of extraction (detect + pool the final boxes again) and of torchvision's model(images),
    at each RPN proposal count of --bench-proposals (default: --proposals); with several, how many of
    the boxes kept with the first count are kept again (a box of IoU >= 0.5) with each other count."""
    g = torch.Generator().manual_seed(0)
    if paths:
        images = [load_image(p, 4 * args.max_size)[0] for p in paths[: args.bench_images]]
    else:  # random 640 x 480 images, for a machine without any
        images = [torch.randint(0, 256, (3, 480, 640), generator=g, dtype=torch.uint8)
                  for _ in range(args.bench_images)]
    images = [t.to(device).float() / 255 for t in images]
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    print(f"{len(images)} images, batch {args.batch_size}, {args.min_size}/{args.max_size} px, {device} {args.dtype}")
    rows, first = {}, None
    for n in args.bench_proposals or [args.proposals]:
        model.rpn._post_nms_top_n["testing"] = args.proposals = n  # the proposals the RPN keeps per image
        ips, kept = time_runs(model, batches, args, device, autocast)
        first = first or kept
        # each box kept with the first count: its best IoU with a box kept with this one
        iou = torch.cat([box_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).max(1)[0]
                         for a, b in zip(first, kept)])
        rows[n] = {**ips, "kept": iou.ge(0.5).float().mean().item(), "best_iou": iou.mean().item()}
        print(f"{n:5d} proposals | extraction {ips['extraction']:.2f} images/s | model(images) "
              f"{ips['model(images)']:.2f} images/s | overhead "
              f"{100 * (ips['model(images)'] / ips['extraction'] - 1):+.1f}% | "
              f"boxes of {next(iter(rows))} proposals kept again {rows[n]['kept']:.0%}, mean best IoU "
              f"{rows[n]['best_iou']:.2f}")
    return {**rows[next(iter(rows))], "by_proposals": rows}


def time_runs(model, batches, args, device, autocast):
    """Images/s of extraction and of model(images), each batch's fastest of 3 rounds after a warm-up
    round, the two alternating batch by batch on the same images; and the boxes extraction kept."""
    runs = {"extraction": lambda b: extract(model, b, args), "model(images)": lambda b: model(b)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, kept = {k: [float("inf")] * len(batches) for k in runs}, []
    for rep in range(4):
        for j, b in enumerate(batches):
            for name, fn in runs.items():
                sync()
                t = time.time()
                with autocast:
                    out = fn(b)
                sync()
                if rep > 0:
                    best[name][j] = min(best[name][j], time.time() - t)
                if rep == 0 and name == "extraction":
                    kept += [o["boxes"] for o in out]
    return {k: sum(len(b) for b in batches) / sum(v) for k, v in best.items()}, kept


if __name__ == "__main__":
    main()
