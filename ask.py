"""
Ask a fine-tuned U-VisualBERT about your own pictures, with the OUT/ckpt.pt that finetune.py wrote.

    python ask.py out/finetune/vqa/ckpt.pt photo.jpg "what color is the car?"      # top-5 answers with probabilities
    python ask.py out/finetune/refcoco/ckpt.pt photo.jpg "the man on the left"      # the chosen box; photo.ask.png
    python ask.py out/finetune/retrieval/ckpt.pt photos/ "a dog on the grass"       # the images ranked, best first
    python ask.py out/finetune/nlvr2/ckpt.pt left.jpg right.jpg "both images contain a dog"   # true or false

An image file goes through the extraction that the training features came from: the checkpoint holds the
feature store's extractor settings (model, weights, box policy, sizes, feature), and extract_features.py's
own functions run with them. An image id instead of a file takes its stored features, from --features
STORE... or else from the stores the model was fine-tuned on: the toy world's ids work as they are
(python ask.py out/finetune/vqa/ckpt.pt 200000 "what color is the chef?"), and their scenes are drawn.
--show writes IMAGE.ask.png: the boxes and tags, and how much [CLS] attends to each region (blue bar) and
to its tag (orange bar) in the last layer, averaged over the heads. --features goes after the text.
"""

import argparse
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import guards
import extract_features as ef
import tasks
import toy
from storage import load_checkpoint, load_weights
from model import Config, VisualBERT

parser = guards.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", help="OUT/ckpt.pt of finetune.py")
parser.add_argument("inputs", nargs="+", metavar="IMAGE... TEXT",
                    help="image files (retrieval: also folders) or stored image ids, then the question or sentence")
parser.add_argument("--features", nargs="+", metavar="STORE",
                    help="stores of the image ids (default: the checkpoint's)")
parser.add_argument("--weights",
                    help="detector weights, as extract_features.py's --weights (default: those the training "
                         "features came from; none: random, for offline tests)")
parser.add_argument("--show", action="store_true",
                    help="write IMAGE.ask.png with boxes, tags and [CLS]'s attention to each")
parser.add_argument("--out", metavar="DIR",
                    help="where the PNGs go (default: beside the image file; here for an image id)")
parser.add_argument("--top", type=guards.POSITIVE_INT, default=5, help="vqa: how many answers to list (%(default)s)")
parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if there is one)")

TAKES = {"vqa": "one image and a question", "refcoco": "one image and a referring expression",
         "nlvr2": "two images (left, right) and a sentence", "retrieval": "images or folders of them, and a caption"}
BLUE, ORANGE, MAGENTA, RED = (40, 90, 230), (245, 140, 20), (255, 0, 255), (230, 0, 0)


def load(path):
    """finetune.py's checkpoint, or one line saying what the file is instead."""
    ckpt = load_checkpoint(path)  # a missing or unreadable file: one line naming it
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= set(ckpt):
        raise SystemExit(f"{path}: not a checkpoint of finetune.py (no model, config and vocab inside)")
    if "head" not in ckpt:
        raise SystemExit(f"{path}: a checkpoint of pretrain.py (no task head inside); ask.py takes finetune.py's")
    if "task" not in ckpt:
        raise SystemExit(f"{path}: from a finetune.py that did not record its task and extractor; fine-tune again")
    return ckpt


def detector(ckpt, path, weights, device):
    """extract_features.py's detector and settings, as they made the checkpoint's training features."""
    s = ckpt["extractor"]
    if s.get("extractor") != "extract_features.py":
        made = s.get("detector") or s.get("source") or "an unknown extractor"
        raise SystemExit(f"{path}: its features come from {made}, not from image files; give an image id of its "
                         f"feature stores (--features STORE)")
    size = re.match(r"shorter side (\d+), longer at most (\d+)", s["image_size"])
    seed = re.fullmatch(r"none \(random, seed (\d+)\)", s["weights"])
    fixed = re.fullmatch(r"fixed (\d+)", s["box_policy"])
    adaptive = re.fullmatch(r"adaptive (\d+)-(\d+) at .*", s["box_policy"])
    if not size or not (fixed or adaptive or s["box_policy"] == "given boxes"):
        raise SystemExit(f"{path}: cannot read its extractor settings {s}")
    flags = ["--model", s["model"], "--feature", s["feature"], "--nms", str(s["nms"]), "--min-size", size[1],
             "--max-size", size[2], "--proposals", str(s["proposals"]), "--score-thresh", str(s["score_thresh"])]
    flags += ["--seed", seed[1] if seed else "0"] + (["--boxes", fixed[1]] if fixed else [])
    flags += ["--min-boxes", adaptive[1], "--max-boxes", adaptive[2]] if adaptive else []
    if weights is None and " sha256:" in s["weights"]:
        raise SystemExit(f"{path}: its features came from the detector weights {s['weights']}; give --weights FILE")
    args = ef.parser.parse_args(flags + ["--weights", weights or ("none" if seed else s["weights"])])
    policy = ef.box_policy(args)
    if s["box_policy"] == "given boxes":  # RefCOCO+ on given boxes: a new image has none, the detector's stand in
        print(f"note: the training features were pooled on given boxes; for a new image the detector's {policy} do")
    elif policy != s["box_policy"]:
        raise SystemExit(f"{path}: cannot read the box policy {s['box_policy']!r} of its extractor settings")
    model, class_names, name = ef.build_model(args)
    if name != s["weights"]:
        print(f"warning: detector weights {name}, but the training features came from {s['weights']}: "
              f"the answers mean little")
    if list(class_names) != list(ckpt["class_names"]):
        raise SystemExit(f"{path}: the detector's {len(class_names)} classes are not the {len(ckpt['class_names'])} "
                         f"it was trained with")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s["dtype"]) if device.type == "cuda" else None
    return model.to(device), args, half


@torch.no_grad()
def extract(path, model, args, half, device):
    """One image file -> its store entry (features rounded to float16, as a store keeps them) and its picture."""
    try:
        pixels, w, h = ef.load_image(path, 4 * args.max_size)
    except Exception as e:  # missing, empty, truncated, not an image, unknown format
        raise SystemExit(f"{path}: the extractor cannot read this image ({type(e).__name__}: {e})".replace("\n", " "))
    with torch.autocast(device.type, half, enabled=half is not None):
        out = ef.extract(model, [pixels.to(device).float() / 255], args)[0]  # alone: batching pads, moving features
    entry = {"features": out["features"].astype(np.float16), "boxes": out["boxes"], "labels": out["labels"],
             "scores": out["scores"], "width": w, "height": h}
    return entry, Image.fromarray(pixels.permute(1, 2, 0).numpy())


def with_attention(model, run):
    """run()'s result, the last layer's attention weights (B, heads, T, T) and where text, tags and regions lie."""
    attn, spans = model.layers[-1].attn, {}
    hook = model.register_forward_hook(lambda module, inputs, out: spans.update(out[1]))
    attn.keep_probs = True
    try:
        out = run()
    finally:
        attn.keep_probs = False
        hook.remove()
    return out, attn.probs, spans


def cls_shares(task, probs, spans, row, entry):
    """How much [CLS] attends, in the last layer and averaged over the heads, to the text and to each
    region and to each region's tag (the sum over its word pieces), in sequence `row` of the batch."""
    a = probs[row, :, 0].mean(0).cpu()  # (T,) sums to 1 over the sequence
    K = len(entry["boxes"])
    tags = torch.zeros(K)
    if "tags" in spans:  # the region of each tag piece; padding of the batch comes after them
        region_of = data.image_inputs([entry], task.tag_pieces)["tag_region"][0]  # (L,)
        tags.index_add_(0, region_of, a[spans["tags"]][:len(region_of)])
    return {"text": a[spans["text"]].sum().item(), "regions": a[spans["regions"]][:K].tolist(), "tags": tags.tolist()}


def draw(picture, entry, names, out_png, caption, shares=None, chosen=None, labelled=False):
    """The picture with its boxes and tags (unless `labelled`: a toy scene has them), the chosen box in
    red, and with `shares` a bar per region (blue) and per tag (orange): [CLS]'s attention to it."""
    width = min(max(picture.width, 640), 1280)  # wide enough for the text, not more than a screen
    picture = picture.resize((width, round(picture.height * width / picture.width)))
    img = Image.new("RGB", (picture.width, picture.height + 40), (255, 255, 255))
    img.paste(picture)
    d = ImageDraw.Draw(img)
    top = max(shares["regions"] + shares["tags"]) if shares else 1.0  # the longest bar, 80 pixels
    for k, (box, label) in enumerate(zip(entry["boxes"], entry["labels"])):
        x1, y1, x2, y2 = (box * [picture.width, picture.height, picture.width, picture.height]).tolist()
        d.rectangle([x1, y1, x2, y2], outline=RED if k == chosen else MAGENTA, width=4 if k == chosen else 2)
        if not labelled:
            d.rectangle(d.textbbox((x1 + 3, y1 + 2), names[label]), fill=(255, 255, 255))
            d.text((x1 + 3, y1 + 2), names[label], fill=(200, 0, 200))
        if shares:  # under the box's label, on white: the region's bar and number, then its tag's
            d.rectangle([x1 + 2, y1 + 15, x1 + 114, y1 + 36], fill=(255, 255, 255))
            for j, (share, color) in enumerate(((shares["regions"][k], BLUE), (shares["tags"][k], ORANGE))):
                d.rectangle([x1 + 3, y1 + 17 + 10 * j, x1 + 3 + 80 * share / top, y1 + 23 + 10 * j], fill=color)
                d.text((x1 + 87, y1 + 15 + 10 * j), f"{share:.2f}", fill=color)
    d.text((6, picture.height + 4), caption, fill=(0, 0, 0))
    if shares:
        d.text((6, picture.height + 22), fill=(0, 0, 0), text=f"[CLS]'s attention in the last layer, mean over heads: "
               f"text {shares['text']:.2f}, regions {sum(shares['regions']):.2f} (blue bars), "
               f"tags {sum(shares['tags']):.2f} (orange bars)")
    img.save(out_png)
    return out_png


def build(ckpt, path, device):
    """The task's model part (tasks.py: its inputs, head and forward passes, as its evaluation runs them),
    from the checkpoint alone, with no benchmark file; the model and the head -> (task, model, head)."""
    name, args = ckpt["task"], argparse.Namespace(**ckpt["args"])
    vocab = data.Vocab(ckpt["vocab"], source=path)
    if name == "vqa":  # its head scores the answer set the checkpoint holds
        task = tasks.VQA(args, vocab, ckpt["class_names"], ckpt["answers"])
    else:
        task = tasks.TASKS[name](args, vocab, ckpt["class_names"])
    task.device = device
    model = VisualBERT(Config(**ckpt["config"]))
    load_weights(model, ckpt["model"], path)
    head = task.make_head(model)
    load_weights(head, ckpt["head"], path)
    return task, model.to(device).eval(), head.to(device).eval()


def add_images(specs, task, model, ckpt, args, device):
    """Each image into task.images: files (a folder's, for retrieval) through the detector, or ids of the
    feature stores -> their keys, the pictures to draw on, and each toy scene's world root."""
    stores = args.features or [s for s in ckpt["args"].get("features") or [] if os.path.isdir(s)]
    try:
        stores = data.Images(stores) if stores else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    keys, pictures, scenes, found = [], {}, {}, None
    for s in specs:
        files = ef.find_images(s) if os.path.isdir(s) else [s] if os.path.isfile(s) else []
        if os.path.isdir(s) and not files:
            raise SystemExit(f"{s}: no images in this folder ({', '.join(ef.EXTENSIONS)})")
        for f in files:
            found = found or detector(ckpt, args.checkpoint, args.weights, device)
            task.images[f], pictures[f] = extract(f, *found, device)
        if not files and stores is not None and s in stores:
            store = stores.where[s]
            if store.feature_dim != model.cfg.feat_dim or list(store.class_names) != list(ckpt["class_names"]):
                raise SystemExit(f"{store.path}: not the features or classes {args.checkpoint} was trained on")
            task.images[s] = e = stores[s]
            root = os.path.dirname(os.path.dirname(store.path))  # a toy world's root/features/NAME: its scene is drawn
            if os.path.exists(os.path.join(root, "scenes.json")):
                scenes[s] = root
            else:
                pictures[s] = Image.new("RGB", (e["width"], e["height"]), (235, 235, 235))
        elif not files:
            where = f", nor an image id of {', '.join(x.path for x in stores.stores)}" if stores else ""
            raise SystemExit(f"{s}: no such image file{where}")
        keys += files or [s]
    return keys, pictures, scenes


# each task's answer, as its evaluation (tasks.py) computes it: (x: the tokenized text) -> the result's
# fields, the last layer's attention and spans, the (image, row of the batch) pairs to show, the caption


def answer_vqa(task, model, head, keys, x, top):
    """The top answers, each with an independent probability: the head was trained with BCE (docs/METHOD.md §6)."""
    x["image"] = keys[0]
    logits, probs, spans = with_attention(model, lambda: task.logits(model, head, [x]))
    best = torch.sigmoid(logits[0]).topk(min(top, len(task.answers)))
    answers = [(task.answers[i], v) for v, i in zip(best.values.tolist(), best.indices.tolist())]
    for a, v in answers:
        print(f"{v:.3f}  {a}")
    caption = f"{x['text']}  ->  {answers[0][0]} ({answers[0][1]:.2f})"
    return {"answers": answers}, probs, spans, [(keys[0], 0)], caption


def answer_refcoco(task, model, head, keys, x, top):
    """The region of a softmax over the regions, as trained, and its box in pixels."""
    x["image"] = keys[0]
    logits, probs, spans = with_attention(model, lambda: task.region_logits(model, head, [x]))
    chosen, e = int(logits[0].argmax()), task.images[keys[0]]
    box = (e["boxes"][chosen] * [e["width"], e["height"], e["width"], e["height"]]).round(1).tolist()
    p = logits[0].softmax(-1)[chosen].item()
    print(f"box {chosen} of {len(e['boxes'])} ({task.class_names[e['labels'][chosen]]}): x1 y1 x2 y2 = "
          f"{' '.join(f'{v:g}' for v in box)} pixels of the {e['width']}x{e['height']} image, probability {p:.3f}")
    result = {"region": chosen, "box": box, "probability": p}
    return result, probs, spans, [(keys[0], 0)], f"{x['text']}  ->  box {chosen} ({p:.2f})"


def answer_nlvr2(task, model, head, keys, x, top):
    """True or false (label 1 is "True") with its probability."""
    x["images"] = tuple(keys)
    logits, probs, spans = with_attention(model, lambda: task.logits(model, head, [x]))
    answer, p = bool(logits[0].argmax()), logits[0].softmax(-1)[1].item()
    p = p if answer else 1 - p
    print(f"{str(answer).lower()} (probability {p:.3f})")
    result = {"answer": answer, "probability": p}
    return result, probs, spans, [(keys[0], 0), (keys[1], 1)], f"{x['text']}  ->  {answer} ({p:.2f})"


def answer_retrieval(task, model, head, keys, x, top):
    """The images ranked by their match score with the caption, best first; the attention shown is the best's."""
    scores = torch.cat([task.scores(model, head, [x["ids"]] * len(c), c) for c in tasks.chunks(keys, 64)])
    ranking = [(keys[i], scores[i].item()) for i in scores.argsort(descending=True).tolist()]
    for r, (k, v) in enumerate(ranking):
        print(f"{r + 1:>4}. {v:8.3f}  {k}")
    best = ranking[0][0]
    _, probs, spans = with_attention(model, lambda: task.scores(model, head, [x["ids"]], [best]))
    caption = f"{x['text']}  ->  best of {len(keys)} ({ranking[0][1]:.2f})"
    return {"ranking": ranking}, probs, spans, [(best, 0)], caption


ANSWERS = {"vqa": answer_vqa, "refcoco": answer_refcoco, "nlvr2": answer_nlvr2, "retrieval": answer_retrieval}


def main(argv=None):
    args = parser.parse_args(argv)
    if not args.inputs[-1].strip():
        raise SystemExit("the text (the last argument) is empty: give the question or sentence to ask about")
    ckpt = load(args.checkpoint)
    name, (*specs, text) = ckpt["task"], args.inputs
    need = {"vqa": 1, "refcoco": 1, "nlvr2": 2}.get(name)
    if not specs or need and (len(specs) != need or any(os.path.isdir(s) for s in specs)):
        raise SystemExit(f"{args.checkpoint}: a checkpoint of {name}, which takes {TAKES[name]}; "
                         f"got {len(specs)} image(s): {specs}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    task, model, head = build(ckpt, args.checkpoint, device)
    x = {"text": text}
    task.tokenize([x])
    if len(x["ids"]) > task.max_len - 2:  # [CLS] and [SEP] take two; the rest would be cut off unsaid
        raise SystemExit(f"the text is {len(x['ids'])} word pieces long ({len(text)} characters); a {name} model "
                         f"takes at most {task.max_len - 2}")
    keys, pictures, scenes = add_images(specs, task, model, ckpt, args, device)
    with torch.no_grad():
        fields, probs, spans, shown, caption = ANSWERS[name](task, model, head, keys, x, args.top)
    result = {"task": name, **fields, "attention": {}}
    for key, row in shown:
        e = task.images[key]
        shares = result["attention"][key] = cls_shares(task, probs, spans, row, e)
        if not (args.show or name == "refcoco"):
            continue
        is_file = os.path.isfile(key)
        stem = os.path.splitext(os.path.basename(key))[0] if is_file else key.replace(os.sep, "_")
        out_png = os.path.join(args.out or (os.path.dirname(key) if is_file else "."), f"{stem}.ask.png")
        os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
        if key in scenes:  # a toy scene, drawn by toy.py with its boxes and tags (its caption cut off)
            pictures[key] = Image.open(toy.draw_scene(scenes[key], key, out_png)).crop((0, 0, e["width"], e["height"]))
        draw(pictures[key], e, task.class_names, out_png, caption, shares if args.show else None,
             fields.get("region"), labelled=key in scenes)
        said = f"text {shares['text']:.2f}, regions {sum(shares['regions']):.2f}, tags {sum(shares['tags']):.2f}"
        print(f"wrote {out_png}" + (f" ([CLS] attends to {said})" if args.show else ""))
    return result


if __name__ == "__main__":
    main()
