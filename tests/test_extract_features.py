"""extract_features.py on images drawn here: store contents, given boxes against a direct computation, the TSV
import round trip, bad files, a killed-and-rerun extraction, sharding. CPU, offline, a random detector."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import storage  # noqa: E402
import extract_features as ef  # noqa: E402

# a small random detector: tiny inputs, few proposals, few boxes
FAST = ["--weights", "none", "--seed", "0", "--min-size", "64", "--max-size", "96", "--proposals", "10", "--boxes", "4", "--workers", "0"]


def draw(path, w, h, seed, mode="RGB", **save):
    """A picture: a background and two rectangles, so the detector sees some structure."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(2):
        x, y = int(rng.integers(0, max(w // 2, 1))), int(rng.integers(0, max(h // 2, 1)))
        d.rectangle([x, y, x + w // 3, y + h // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im.convert(mode).save(path, **save)


def exif_jpeg(path):
    """Stored 80 x 40 with its left half red; EXIF orientation 6 says: turn 90 degrees clockwise to view."""
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes(), quality=95)


def store_dict(path):
    s = storage.FeatureStore(path)
    return {i: s[i] for i in s.ids()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good images of every kind, and four bad files."""
    d = tmp_path_factory.mktemp("images")
    draw(d / "plain.jpg", 120, 90, 0)
    draw(d / "plain2.png", 70, 150, 1)
    os.makedirs(d / "sub")
    draw(d / "sub" / "nested.webp", 100, 100, 2)
    draw(d / "bitmap.bmp", 90, 64, 3)
    draw(d / "tiny.png", 5, 3, 4)
    draw(d / "large.jpg", 3000, 2000, 5)
    draw(d / "gray.png", 80, 60, 6, mode="L")
    exif_jpeg(d / "rotated.jpg")
    open(d / "empty.jpg", "wb").close()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.png").write_text("not an image at all\n")
    (d / "broken.bmp").write_bytes(b"BM" + bytes(range(256)) * 4)
    return d


GOOD = {"plain": (120, 90), "plain2": (70, 150), "nested": (100, 100), "bitmap": (90, 64), "tiny": (5, 3),
        "large": (3000, 2000), "gray": (80, 60), "rotated": (40, 80)}  # id -> (width, height) upright
BAD = {"empty.jpg", "truncated.jpg", "text.png", "broken.bmp"}


def test_store_holds_every_good_image_and_lists_bad_files(folder, tmp_path, capsys):
    out = str(tmp_path / "store")
    ef.main(FAST + ["--images", str(folder), "--out", out, "--batch-size", "3"])
    assert "4 skipped" in capsys.readouterr().out.splitlines()[-1]
    store = storage.FeatureStore(out)
    assert sorted(store.ids()) == sorted(GOOD)
    assert store.feature_dim == 1024 and len(store.class_names) == 91 and store.class_names[1] == "person"
    meta = store.meta["extractor"]
    assert meta["box_policy"] == "fixed 4" and meta["model"] == "fasterrcnn_resnet50_fpn_v2" and meta["feature"] == "box_head"
    for image_id, (w, h) in GOOD.items():
        x = store[image_id]
        assert x["features"].shape == (4, 1024) and np.isfinite(x["features"]).all()
        assert x["boxes"].shape == (4, 4) and (x["boxes"] >= 0).all() and (x["boxes"] <= 1).all()
        assert (x["boxes"][:, 2] >= x["boxes"][:, 0]).all() and (x["boxes"][:, 3] >= x["boxes"][:, 1]).all()
        assert ((x["labels"] >= 1) & (x["labels"] <= 90)).all() and ((x["scores"] > 0) & (x["scores"] <= 1)).all()
        assert (x["width"], x["height"]) == (w, h), image_id
    lines = open(os.path.join(out, "skipped.txt")).read().splitlines()
    assert sorted(os.path.basename(line.split("\t")[0]) for line in lines) == sorted(BAD)
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)  # path<TAB>reason
    # a rerun has nothing left to do and lists no bad file twice; other settings are refused
    ef.main(FAST + ["--images", str(folder), "--out", out])
    assert open(os.path.join(out, "skipped.txt")).read().splitlines() == lines
    assert "0 to go" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="meta.json: this store was made with other settings"):
        ef.main(FAST + ["--boxes", "5", "--images", str(folder), "--out", out])


def test_pixels_become_upright_8bit_rgb(tmp_path):
    def load(name, im, **save):
        im.save(tmp_path / name, **save)
        t, w, h = ef.load_image(str(tmp_path / name), 10_000)
        assert t.dtype == torch.uint8 and t.shape == (3, h, w)
        return t.permute(1, 2, 0).numpy().astype(int)  # (H, W, 3)

    assert (load("g.png", Image.new("L", (8, 8), 100)) == 100).all()  # grayscale
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red -> white, opaque blue stays
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    a = load("a.png", rgba)
    assert (a[:, 4:] == 255).all() and (a[:, :4] == [0, 0, 255]).all()
    assert (load("la.png", Image.new("LA", (4, 4), (10, 0))) == 255).all()
    assert (load("p.png", Image.new("RGB", (8, 8), (0, 200, 0)).quantize(4)) == [0, 200, 0]).all()  # palette
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 200, 0] * 256)
    assert (load("pt.png", p, transparency=0) == 255).all()  # palette with a transparent colour: white
    cmyk = load("c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)  # CMYK red
    assert np.abs(cmyk - [255, 0, 0]).max() <= 8
    g16 = np.zeros((4, 8), np.uint16)
    g16[:, :4], g16[:, 4:] = 65535, 128 * 257  # 16-bit white and mid grey, not clipped to white
    assert load("i16.png", Image.fromarray(g16)).tolist() == np.repeat(np.where(g16 > 40000, 255, 128)[..., None], 3, -1).tolist()
    exif_jpeg(tmp_path / "r.jpg")
    t, w, h = ef.load_image(str(tmp_path / "r.jpg"), 10_000)
    assert (w, h) == (40, 80)  # upright: the stored left half is now the top half
    top, bottom = t[:, :35].float().mean((1, 2)), t[:, 45:].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    t, w, h = ef.load_image(str(tmp_path / "r.jpg"), 20)  # very large: reduced by an integer factor
    assert (w, h) == (40, 80) and t.shape == (3, 20, 10)


def test_duplicate_stems_fail_at_start(tmp_path):
    draw(tmp_path / "a.jpg", 32, 32, 0)
    os.makedirs(tmp_path / "sub")
    draw(tmp_path / "sub" / "a.png", 32, 32, 1)
    with pytest.raises(SystemExit, match="a.jpg.*a.png"):
        ef.main(FAST + ["--images", str(tmp_path), "--out", str(tmp_path / "out")])


def test_box_policy():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.3, 0.5])  # NMS at 0.5 keeps 0 and 2; 1 and 3 are suppressed by 0
    fixed = lambda k: Namespace(nms=0.5, adaptive=False, boxes=k)  # noqa: E731
    adaptive = lambda lo, hi: Namespace(nms=0.5, adaptive=True, min_boxes=lo, max_boxes=hi, score_thresh=0.4)  # noqa: E731
    assert [ef.select_boxes(boxes, scores, fixed(2))[0].tolist()] == [[0, 2]]
    assert ef.select_boxes(boxes, scores, fixed(3))[0].tolist() == [0, 2, 1]  # the best suppressed box fills in
    keep, n = ef.select_boxes(boxes, scores, fixed(6))
    assert keep.tolist() == [0, 2, 1, 3] and n == 6  # two whole-image boxes pad the rest
    assert ef.select_boxes(boxes, scores, adaptive(1, 5))[0].tolist() == [0]  # only box 0 scores >= 0.4
    assert ef.select_boxes(boxes, scores, adaptive(3, 5))[0].tolist() == [0, 2, 1]
    assert ef.select_boxes(boxes, scores, adaptive(1, 1))[0].tolist() == [0]


@pytest.fixture(scope="module")
def detector():
    """The detector built here, independently of extract_features.py: same seed, same architecture."""
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, min_size=64, max_size=96, rpn_post_nms_top_n_test=2).eval()


@pytest.mark.parametrize("feature", ["box_head", "c5"])
def test_given_boxes_are_the_box_head_on_roi_aligned_features(tmp_path, detector, feature):
    draw(tmp_path / "g0.jpg", 80, 60, 0)
    draw(tmp_path / "g1.png", 64, 96, 1)
    draw(tmp_path / "g2.png", 64, 64, 2)
    draw(tmp_path / "unlisted.png", 64, 64, 3)
    given = {"g0": [[5, 5, 40, 30], [0, 0, 80, 60], [30.5, 10.25, 79, 59]], "g1.png": [[10, 20, 60, 90]], "g2": []}
    (tmp_path / "boxes.json").write_text(json.dumps(given))
    out = str(tmp_path / "store")
    ef.main(FAST + ["--images", str(tmp_path), "--out", out, "--given-boxes", str(tmp_path / "boxes.json"),
                    "--feature", feature, "--batch-size", "1"])
    store = storage.FeatureStore(out)
    assert sorted(store.ids()) == ["g0", "g1", "g2"] and len(store["g2"]["boxes"]) == 0
    assert store.meta["extractor"]["box_policy"] == "given boxes"
    with torch.inference_mode():
        for image_id, file in [("g0", "g0.jpg"), ("g1", "g1.png")]:
            img = to_tensor(Image.open(tmp_path / file).convert("RGB"))  # (3, H, W) in [0, 1]
            H, W = img.shape[1:]
            boxes = torch.tensor(given.get(image_id, given.get(file)))  # (K, 4) pixels of the original
            batch, _ = detector.transform([img])
            h, w = batch.image_sizes[0]
            resized = boxes * torch.tensor([w / W, h / H, w / W, h / H])  # the same boxes on the resized image
            body = detector.backbone.body(batch.tensors)
            if feature == "box_head":
                pooled = detector.roi_heads.box_roi_pool(detector.backbone.fpn(body), [resized], batch.image_sizes)  # (K, 256, 7, 7)
                expected = detector.roi_heads.box_head(pooled)  # (K, 1024)
            else:
                expected = torchvision.ops.roi_align(body["3"], [resized], 7, 1 / 32, 2).mean((2, 3))  # (K, 2048)
            x = store[image_id]
            np.testing.assert_allclose(x["features"], expected.numpy().astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(x["boxes"], (boxes / torch.tensor([W, H, W, H])).numpy(), atol=1e-6)
            assert (x["width"], x["height"]) == (W, H) and ((x["labels"] >= 1) & (x["labels"] <= 90)).all()


def test_detections_match_torchvision_and_pad_with_the_whole_image(detector, tmp_path):
    draw(tmp_path / "d.png", 80, 60, 7)
    img = to_tensor(Image.open(tmp_path / "d.png").convert("RGB"))  # (3, 60, 80)
    args = Namespace(nms=0.3, adaptive=False, boxes=5, feature="box_head")
    out = ef.extract(detector, [img], args)[0]  # this detector has at most 2 proposals: 3 or more boxes are padding
    assert out["features"].shape == (5, 1024) and out["boxes"].shape == (5, 4)
    assert (out["boxes"][2:] == [0, 0, 1, 1]).all() and ((out["labels"] >= 1) & (out["labels"] <= 90)).all()
    # torchvision's own postprocessing with nothing thrown away: its best (box, class) is our first box
    rh = detector.roi_heads
    saved = rh.score_thresh, rh.nms_thresh, rh.detections_per_img
    rh.score_thresh, rh.nms_thresh, rh.detections_per_img = 0.0, 1.0, 1000
    try:
        with torch.inference_mode():
            tv = detector([img])[0]  # boxes in pixels of the original image, best first
    finally:
        rh.score_thresh, rh.nms_thresh, rh.detections_per_img = saved
    np.testing.assert_allclose(out["boxes"][0] * [80, 60, 80, 60], tv["boxes"][0].numpy(), rtol=1e-4, atol=1e-3)
    assert out["labels"][0] == tv["labels"][0] and abs(out["scores"][0] - tv["scores"][0].item()) < 1e-5


def test_tsv_import_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    rows = []
    for image_id, K, w, h in [("COCO_val2014_000000000042", 36, 640, 480), ("2345", 10, 500, 333), ("x1", 1, 100, 80)]:
        x1, y1 = rng.uniform(0, w / 2, K), rng.uniform(0, h / 2, K)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, K), y1 + rng.uniform(1, h / 2, K)], 1).astype(np.float32)
        r = dict(img_id=image_id, img_h=h, img_w=w, objects_id=rng.integers(0, 1600, K), objects_conf=rng.random(K, np.float32),
                 attrs_id=rng.integers(0, 400, K), attrs_conf=rng.random(K, np.float32), num_boxes=K, boxes=boxes,
                 features=(rng.standard_normal((K, 2048)) * 3).astype(np.float32))
        rows.append(r)
    with open(tmp_path / "f.tsv", "w") as f:
        for r in rows:
            f.write("\t".join(b64(v) if isinstance(v, np.ndarray) else str(v) for v in (r[k] for k in ef.TSV_FIELDS)) + "\n")
    (tmp_path / "objects.txt").write_text("".join(f"obj{i},synonym{i}\n" for i in range(1600)))
    (tmp_path / "attributes.txt").write_text("".join(f"attr{i}\n" for i in range(400)))
    out = str(tmp_path / "store")
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--vocab", str(tmp_path / "objects.txt"),
             "--attr-vocab", str(tmp_path / "attributes.txt"), "--out", out, "--shard-size", "2"])
    store = storage.FeatureStore(out)
    assert store.class_names[:2] == ["obj0", "obj1"] and len(store.class_names) == 1600 and store.attr_names[399] == "attr399"
    assert store.ids() == [r["img_id"] for r in rows] and store.feature_dim == 2048
    for r in rows:
        x, (w, h) = store[r["img_id"]], (r["img_w"], r["img_h"])
        assert (x["width"], x["height"]) == (w, h)
        assert np.array_equal(x["labels"], r["objects_id"]) and np.array_equal(x["attributes"], r["attrs_id"])
        assert np.array_equal(x["scores"], r["objects_conf"]) and np.array_equal(x["attr_scores"], r["attrs_conf"])
        assert np.array_equal(x["boxes"], r["boxes"] / np.array([w, h, w, h], np.float32))
        assert np.array_equal(x["features"], r["features"].astype(np.float16).astype(np.float32))  # the store keeps fp16
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "plain")])  # no vocabulary: class_<i>
    assert storage.FeatureStore(str(tmp_path / "plain")).class_names[7] == "class_7"


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    d = tmp_path_factory.mktemp("six")
    for i in range(6):
        draw(d / f"im{i}.jpg", 64 + 16 * i, 96 - 8 * i, 10 + i)
    return d


def test_killed_and_rerun_equals_uninterrupted(six, tmp_path):
    args = FAST + ["--images", str(six), "--batch-size", "2", "--shard-size", "1"]
    ef.main(args + ["--out", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "extract_features.py")] + args + ["--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(out.glob("*.index.json")) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    proc.wait()
    assert 1 <= len(storage.FeatureStore(str(out))) < 6, "the kill should land mid-run"
    ef.main(args + ["--out", str(out)])
    whole, rerun = store_dict(str(tmp_path / "whole")), store_dict(str(out))
    assert sorted(whole) == sorted(rerun) == [f"im{i}" for i in range(6)]
    for i in whole:
        for k in ("features", "boxes", "labels", "scores", "width", "height"):
            assert np.array_equal(whole[i][k], rerun[i][k]), (i, k)


def test_shards_read_as_one_store(six, tmp_path):
    out = str(tmp_path / "store")
    for rank in (1, 0):
        ef.main(FAST + ["--images", str(six), "--out", out, "--shard", str(rank), "--num-shards", "2"])
    assert sorted(f for f in os.listdir(out) if f.endswith(".index.json")) == ["shard0-00000.index.json", "shard1-00000.index.json"]
    assert sorted(storage.FeatureStore(out).ids()) == [f"im{i}" for i in range(6)]


def test_bench_reports_both_rates():
    ips = ef.main(FAST + ["--bench", "--bench-images", "1", "--batch-size", "1"])
    assert ips["extraction"] > 0 and ips["model(images)"] > 0


def test_bench_sweeps_proposal_counts():
    ips = ef.main(FAST + ["--bench", "--bench-images", "2", "--batch-size", "2", "--bench-proposals", "10", "3"])
    rows = ips["by_proposals"]
    assert list(rows) == [10, 3] and ips["extraction"] == rows[10]["extraction"]
    assert rows[10]["kept"] == 1.0 and rows[10]["best_iou"] == pytest.approx(1.0)  # the first count against itself
    assert 0 <= rows[3]["kept"] <= 1 and rows[3]["best_iou"] < 1  # 3 proposals cannot hold the 4 boxes kept from 10
    assert all(r["extraction"] > 0 and r["model(images)"] > 0 for r in rows.values())
