"""ask.py: each task's answers against what finetune.py's evaluation computed for the same items (toy world);
real PNG files through extract_features.py, finetune.py and ask.py with a random detector; the attention
weights it shows; every bad input."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import storage  # noqa: E402
import ask  # noqa: E402
import data  # noqa: E402
import extract_features as ef  # noqa: E402
import finetune as ft  # noqa: E402
import tasks  # noqa: E402
from model import Config, VisualBERT  # noqa: E402
from toy import make_toy_world  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


EVALUATED = {"vqa": "logits", "nlvr2": "logits", "retrieval": "score_matrix", "refcoco": "region_logits"}


def finetune_recording(mp, argv, task):
    """finetune.main(argv), and what its evaluation computed: [(task, items or split, output)] of each call
    of the task's forward method made while the model was in eval mode."""
    cls, calls = tasks.TASKS[task], []
    real = getattr(cls, EVALUATED[task])

    def recorder(self, model, head, what, *rest):
        out = real(self, model, head, what, *rest)
        if not model.training:
            calls.append((self, what, out))
        return out

    mp.setattr(cls, EVALUATED[task], recorder)
    ft.main(argv)
    return calls


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


@pytest.fixture(scope="module")
def tuned(toy, tmp_path_factory):
    """Each task fine-tuned for an epoch on the small toy world: its checkpoint and its evaluation's outputs."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for task in EVALUATED:
            d = tmp_path_factory.mktemp(task)
            argv = ["--task", task, "--toy-root", toy, "--out", str(d), "--epochs", "1", "--batch-size", "8",
                    "--min-answer-count", "1", "--log-every", "100"]
            calls = finetune_recording(mp, argv, task)
            out[task] = (str(d / "ckpt.pt"), calls)
    return out


# -----------------------------------------------------------------------------
# each task on the toy world: ask.py's answer is the evaluation's prediction


def test_vqa_as_evaluated(tuned):
    ckpt, [(task, items, logits), *_] = tuned["vqa"]
    for x, row in zip(items[:3], logits):
        r = ask.main([ckpt, x["image"], x["text"]])
        top = torch.sigmoid(row).topk(5)
        assert [a for a, _ in r["answers"]] == [task.answers[i] for i in top.indices]  # the first is the prediction
        assert [v for _, v in r["answers"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_refcoco_as_evaluated(tuned, tmp_path):
    ckpt, [(task, items, logits), *_] = tuned["refcoco"]
    for x, row in zip(items[:3], logits):
        r = ask.main([ckpt, x["image"], x["text"], "--out", str(tmp_path)])
        assert r["region"] == int(row.argmax())
        assert r["probability"] == pytest.approx(row.softmax(-1).max().item(), abs=1e-5)
        e = task.images[x["image"]]
        W, H = e["width"], e["height"]
        assert r["box"] == pytest.approx((e["boxes"][r["region"]] * [W, H, W, H]).tolist(), abs=0.05)  # in pixels
    # the chosen box is drawn, in red, on the toy scene; without --show no attention bars
    img = np.asarray(Image.open(tmp_path / f"{x['image']}.ask.png"))
    assert img.shape == (480 + 40, 640, 3)
    assert (img == ask.RED).all(-1).sum() > 100 and (img == ask.BLUE).all(-1).sum() == 0


def test_nlvr2_as_evaluated(tuned):
    ckpt, [(task, items, logits), *_] = tuned["nlvr2"]
    for x, row in zip(items[:3], logits):
        r = ask.main([ckpt, *x["images"], x["text"]])
        p_true = row.softmax(-1)[1].item()
        assert r["answer"] == bool(row.argmax())
        assert r["probability"] == pytest.approx(max(p_true, 1 - p_true), abs=1e-5)


def test_retrieval_as_evaluated(tuned):
    ckpt, [(task, split, (scores, gold)), *_] = tuned["retrieval"]
    images = [im["image"] for im in task.splits[split]]
    for m in (0, 7):  # two captions, of two images
        caption = [c for im in task.splits[split] for c in im["captions"]][m]
        r = ask.main([ckpt, *images, caption])
        order = scores[m].argsort(descending=True).tolist()
        assert [k for k, _ in r["ranking"]] == [images[i] for i in order]
        assert [v for _, v in r["ranking"]] == pytest.approx(scores[m][order].tolist(), abs=1e-5)


def test_built_from_the_checkpoint_alone(tuned, toy, monkeypatch):
    """ask.py builds a task's head and forward passes from the checkpoint alone: with the toy world's task
    files gone and tasks.py's loaders refusing to run, each task's model part is made by its own class from
    what the checkpoint holds, and ask.py answers as the evaluation did."""
    for loader in ("load_vqa", "load_nlvr2", "load_karpathy", "load_refcoco", "read_answer_set"):
        monkeypatch.setattr(tasks, loader, lambda *a, name=loader: pytest.fail(f"{name}: a benchmark file read"))
    files, away = os.path.join(toy, "tasks"), os.path.join(toy, "tasks-away")
    os.rename(files, away)
    try:
        for name, (path, _) in tuned.items():
            ckpt = ask.load(path)
            task, model, head = ask.build(ckpt, path, torch.device("cpu"))
            args, vocab = argparse.Namespace(**ckpt["args"]), data.Vocab(ckpt["vocab"])
            own = tasks.TASKS[name](args, vocab, ckpt["class_names"], *([ckpt["answers"]] if name == "vqa" else []))
            assert type(task) is type(own) and not hasattr(task, "splits")
            shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
            assert shapes(own.make_head(model)) == shapes(head)
        ckpt, [(task, items, logits), *_] = tuned["vqa"]
        r = ask.main([ckpt, items[0]["image"], items[0]["text"]])
        assert [a for a, _ in r["answers"]] == [task.answers[i] for i in torch.sigmoid(logits[0]).topk(5).indices]
    finally:
        os.rename(away, files)


# -----------------------------------------------------------------------------
# the attention weights shown


def test_attention_weights_are_the_ones_used():
    """With keep_probs the last layer keeps softmax(q k / sqrt(d)) over the unmasked keys: each row sums to 1,
    padding gets 0, and the weights times the values give the layer's own output; the output is unchanged."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=40, feat_dim=12, num_labels=7)
    model = VisualBERT(cfg).eval()
    inputs = dict(input_ids=torch.randint(5, 50, (2, 6)), attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
                  feats=torch.randn(2, 3, 12), boxes=torch.rand(2, 3, 4),
                  region_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    attn, seen = model.layers[-1].attn, {}
    attn.register_forward_hook(lambda m, i, out: seen.update(x=i[0], out=out))
    with torch.no_grad():
        h, _ = model(**inputs)
        assert attn.probs is None  # the default path keeps nothing
        attn.keep_probs = True
        h2, _ = model(**inputs)
    assert torch.equal(h, h2)
    probs = attn.probs  # (B, heads, T, T)
    mask = torch.cat([inputs["attention_mask"], inputs["region_mask"]], 1).bool()
    assert probs.shape == (2, 4, 9, 9) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 9))
    assert (probs[1][..., ~mask[1]] == 0).all()
    v = attn.value(seen["x"]).view(2, 9, 4, 8).transpose(1, 2)  # (B, heads, T, hs)
    assert torch.allclose(attn.out((probs @ v).transpose(1, 2).reshape(2, 9, 32)), seen["out"], atol=1e-5)


def test_shown_shares_add_up(tuned, tmp_path):
    ckpt, [(task, items, _), *_] = tuned["vqa"]
    x = items[0]
    r = ask.main([ckpt, x["image"], x["text"], "--show", "--out", str(tmp_path)])
    shares, e = r["attention"][x["image"]], task.images[x["image"]]
    assert len(shares["regions"]) == len(shares["tags"]) == len(e["boxes"])
    # [CLS]'s row sums to 1 over the sequence: text, regions and tags share it all
    assert shares["text"] + sum(shares["regions"]) + sum(shares["tags"]) == pytest.approx(1, abs=1e-5)
    # by hand: a tag's share is the sum over its pieces, each carrying its region's box (toy boxes are all different)
    model = VisualBERT(Config(**torch.load(ckpt, weights_only=False)["config"])).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    inputs = task.encode([x["ids"]], [x["image"]])
    with torch.no_grad():
        (_, spans), probs, _ = ask.with_attention(model, lambda: model(**inputs))
    a = probs[0, :, 0].mean(0)
    assert a[spans["regions"]].tolist() == pytest.approx(shares["regions"], abs=1e-6)
    for k, box in enumerate(inputs["boxes"][0]):
        pieces = (inputs["tag_boxes"][0] == box).all(-1)
        assert a[spans["tags"]][pieces].sum().item() == pytest.approx(shares["tags"][k], abs=1e-6)
    img = np.asarray(Image.open(tmp_path / f"{x['image']}.ask.png"))  # the scene with a blue and an orange bar per box
    assert img.shape == (520, 640, 3) and (img == ask.BLUE).all(-1).any() and (img == ask.ORANGE).all(-1).any()


# -----------------------------------------------------------------------------
# real image files: PNGs -> extract_features.py -> finetune.py --task vqa (a VQA v2 fixture) -> ask.py

FAST = ["--weights", "none", "--seed", "0", "--model", "fasterrcnn_mobilenet_v3_large_fpn", "--min-size", "64",
        "--max-size", "96", "--proposals", "10", "--boxes", "4", "--workers", "0"]
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
WORDS = "what color is the square ? how many squares are there one two red green blue person".split()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    os.makedirs(d / "images")
    questions, annotations = {"train2014": [], "val2014": []}, {"train2014": [], "val2014": []}
    for i in range(1, 7):  # images 1-4 train, 5-6 val
        color = list(COLORS)[i % 3]
        im = Image.new("RGB", (96 + 8 * i, 80), (250, 250, 250))
        ImageDraw.Draw(im).rectangle([10 + 3 * i, 12, 60, 60], fill=COLORS[color])
        im.save(d / "images" / f"{i}.png")
        split = "train2014" if i <= 4 else "val2014"
        for q, a in (("what color is the square?", color), ("how many squares are there?", "1")):
            qid = len(questions["train2014"]) + len(questions["val2014"]) + 1
            questions[split].append({"image_id": i, "question": q, "question_id": qid})
            annotations[split].append({"question_id": qid, "image_id": i, "question_type": q[:8],
                                       "answer_type": "other", "multiple_choice_answer": a,
                                       "answers": [{"answer": a, "answer_id": k + 1} for k in range(10)]})
    os.makedirs(d / "vqa")
    for split in questions:
        with open(d / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json", "w") as f:
            json.dump({"questions": questions[split]}, f)
        with open(d / "vqa" / f"v2_mscoco_{split}_annotations.json", "w") as f:
            json.dump({"annotations": annotations[split]}, f)
    ef.main(FAST + ["--images", str(d / "images"), "--out", str(d / "store"), "--batch-size", "1"])  # one at a time
    store = storage.FeatureStore(str(d / "store"))
    vocab = list(data.Vocab.RESERVED) + WORDS
    cfg = Config(vocab_size=len(vocab), hidden=32, layers=2, heads=4, ffn=64, max_positions=40,
                 feat_dim=store.feature_dim, num_labels=len(store.class_names), dropout=0.0, init_std=0.18)
    pretrained = {"model": VisualBERT(cfg).state_dict(), "config": cfg.to_dict(), "vocab": vocab,
                  "class_names": store.class_names}
    torch.save(pretrained, d / "pretrained.pt")  # what pretrain.py writes, less its optimiser
    argv = ["--task", "vqa", "--data", str(d / "vqa"), "--features", str(d / "store"),
            "--init-from", str(d / "pretrained.pt"), "--out", str(d / "out"), "--epochs", "2", "--batch-size", "4",
            "--min-answer-count", "1"]
    with pytest.MonkeyPatch.context() as mp:
        calls = finetune_recording(mp, argv, "vqa")
    return d, calls


def test_a_real_png_through_extraction_finetuning_and_ask(real, tmp_path, capsys):
    d, [(task, items, logits)] = real
    [(x, row)] = [(x, row) for x, row in zip(items, logits) if x["image"] == "5" and x["text"].startswith("what color")]
    png = str(d / "images" / "5.png")
    for flags in (["--weights", "none"], []):  # the checkpoint's own detector settings by default
        r = ask.main([str(d / "out" / "ckpt.pt"), png, x["text"], "--show", "--out", str(tmp_path), *flags])
        top = torch.sigmoid(row).topk(min(5, len(task.answers)))
        assert [a for a, _ in r["answers"]] == [task.answers[i] for i in top.indices]
        assert [v for _, v in r["answers"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert "warning" not in capsys.readouterr().out  # the same detector weights as the store's
    assert Image.open(tmp_path / "5.ask.png").size == (640, round(80 * 640 / 136) + 40)  # widened, two lines below
    shares = r["attention"][png]
    assert shares["text"] + sum(shares["regions"]) + sum(shares["tags"]) == pytest.approx(1, abs=1e-5)
    # the image file went through the very extraction that made the stored features
    ckpt = ask.load(str(d / "out" / "ckpt.pt"))
    entry, picture = ask.extract(png, *ask.detector(ckpt, "ckpt.pt", None, torch.device("cpu")), torch.device("cpu"))
    stored = storage.FeatureStore(str(d / "store"))["5"]
    assert np.array_equal(entry["features"], stored["features"].astype(np.float16))
    assert np.allclose(entry["boxes"], stored["boxes"]) and np.array_equal(entry["labels"], stored["labels"])
    assert (entry["width"], entry["height"]) == (136, 80) == picture.size
    # a store id instead of the file: the same answers
    r2 = ask.main([str(d / "out" / "ckpt.pt"), "5", x["text"], "--features", str(d / "store")])
    assert r2["answers"] == r["answers"]


def test_extractor_settings_read_back(real, capsys):
    d, _ = real
    ckpt = ask.load(str(d / "out" / "ckpt.pt"))
    s = ckpt["extractor"]
    assert s["model"] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert (s["box_policy"], s["weights"]) == ("fixed 4", "none (random, seed 0)")
    cpu = torch.device("cpu")
    _, args, half = ask.detector(ckpt, "ckpt.pt", None, cpu)
    assert (args.min_size, args.max_size, args.proposals, args.boxes, args.seed) == (64, 96, 10, 4, 0)
    assert not args.adaptive
    assert half is None  # fp32 on a CPU
    ckpt["extractor"] = {**s, "box_policy": "adaptive 3-7 at score >= 0.2"}
    _, args, _ = ask.detector(ckpt, "ckpt.pt", None, cpu)
    assert (args.adaptive, args.min_boxes, args.max_boxes, args.max_k) == (True, 3, 7, 7)
    ckpt["extractor"] = {**s, "box_policy": "given boxes"}
    _, args, _ = ask.detector(ckpt, "ckpt.pt", None, cpu)
    assert args.boxes == 36 and "the detector's fixed 36 do" in capsys.readouterr().out
    ckpt["extractor"] = {**s, "weights": "mine.pth sha256:0123456789abcdef"}
    with pytest.raises(SystemExit, match=r"ckpt.pt: its features came from the detector weights mine.pth"):
        ask.detector(ckpt, "ckpt.pt", None, cpu)
    ckpt["extractor"] = {**s, "weights": "none (random, seed 3)"}  # the random detector of the features' seed
    for weights in (None, "none"):
        _, args, _ = ask.detector(ckpt, "ckpt.pt", weights, cpu)
        assert args.seed == 3 and "warning" not in capsys.readouterr().out
    ckpt["extractor"] = {**s, "weights": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"}  # not those asked for
    ask.detector(ckpt, "ckpt.pt", "none", cpu)
    assert ("warning: detector weights none (random, seed 0), but the training features came from "
            "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1") in capsys.readouterr().out


# -----------------------------------------------------------------------------
# bad input: one line naming the file and the problem, a non-zero exit


def test_bad_input(tuned, real, tmp_path):
    d, _ = real
    vqa, nlvr2, retrieval = tuned["vqa"][0], tuned["nlvr2"][0], tuned["retrieval"][0]
    real_ckpt = str(d / "out" / "ckpt.pt")
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    os.makedirs(tmp_path / "empty")
    cases = [
        ([real_ckpt, str(tmp_path / "nope.jpg"), "q?"], r"nope.jpg: no such image file, nor an image id of .*store"),
        ([real_ckpt, str(tmp_path / "text.png"), "q?"], r"text.png: the extractor cannot read this image \(Un"),
        ([vqa, str(d / "images" / "1.png"), "q?"], r"ckpt.pt: its features come from toy world simulated detector"),
        ([nlvr2, "200000", "a dog ."], r"ckpt.pt: a checkpoint of nlvr2, which takes two images.*got 1"),
        ([vqa, str(d / "images"), "q?"], r"ckpt.pt: a checkpoint of vqa, which takes one image and a question; got 1"),
        ([vqa, "what color?"], r"ckpt.pt: a checkpoint of vqa, which takes one image and a question; got 0"),
        ([retrieval, str(tmp_path / "empty"), "a dog"], r"empty: no images in this folder"),
        ([str(d / "pretrained.pt"), "5", "q?"], r"pretrained.pt: a checkpoint of pretrain.py \(no task head inside\)"),
        ([str(tmp_path / "notes.pt"), "5", "q?"], r"notes.pt: not a readable checkpoint"),
        ([str(tmp_path / "none.pt"), "5", "q?"], r"none.pt: checkpoint not found"),
        ([real_ckpt, "5", "q?", "--features", str(tmp_path)], r"not a feature store \(no meta.json\)"),
        ([vqa, "5", "q?", "--features", str(d / "store")], r"store: not the features or classes .*ckpt.pt was"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            ask.main(argv)
    # as a command: the one line on stderr, no traceback, exit status 1
    r = subprocess.run([sys.executable, os.path.join(REPO, "ask.py"), real_ckpt, str(tmp_path / "text.png"), "q?"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"{tmp_path / 'text.png'}: the extractor cannot read this image")
