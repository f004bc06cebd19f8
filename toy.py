"""
The toy world: a miniature of the paper's setting, made from a seed in seconds, so that everything runs
with no download.

Scenes of objects with classes in semantic groups, colours, sizes and positions; a simulated detector
that sees each object as a noisy box, a feature vector (class + group + colour + size + noise, so related
classes have related features), a top-1 tag that is sometimes wrong (confused within the group) and a
confidence; captions; general text that uses the same words outside captions; and the four downstream
tasks in the real datasets' file formats. Everything is written in the formats real data comes in, so
no other code can tell toy from real.

    python toy.py                   # make the toy world under toy_world/ (pretrain.py does it on first use)
    python toy.py --show pt000003   # draw one scene: pt000003.png with boxes, tags and scores, a caption
"""

import json
import os
import shutil
import zlib

import numpy as np

from common import read_json, write_atomic, write_json
from data import FeatureStore, FeatureWriter, Vocab

TOY_DIR = "toy_world"
VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_vocab.txt")  # made by train_vocab
GROUPS = {
    "vehicle": ["car", "truck", "bus", "bicycle", "motorcycle", "fire truck"],
    "animal": ["dog", "cat", "horse", "cow", "sheep", "bird"],
    "kitchenware": ["cup", "bowl", "plate", "knife", "fork", "spoon"],
    "food": ["apple", "banana", "pizza", "sandwich", "cake", "hot dog"],
    "furniture": ["chair", "table", "bed", "sofa", "bench", "lamp"],
    "person": ["man", "woman", "boy", "girl", "baby", "chef"],
    "background": ["road", "sky", "wall", "floor", "grass", "window"],
}
CLASSES = [c for g in GROUPS.values() for c in g]
GROUP_OF = {c: g for g, cs in GROUPS.items() for c in cs}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
SIZES = ["small", "large"]
PLURAL = {"bus": "buses", "sheep": "sheep", "knife": "knives", "bench": "benches", "man": "men", "woman": "women",
          "baby": "babies", "sandwich": "sandwiches", "fire truck": "fire trucks", "hot dog": "hot dogs",
          "glass": "glasses"}
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
SCENES = {  # scene type: (groups its objects come from, background classes)
    "street": (["vehicle", "vehicle", "person", "animal"], ["road", "sky"]),
    "kitchen": (["kitchenware", "food", "person"], ["wall", "floor"]),
    "farm": (["animal", "animal", "person", "vehicle"], ["grass", "sky"]),
    "living room": (["furniture", "person", "animal"], ["wall", "window"]),
    "dining room": (["food", "kitchenware", "furniture"], ["floor", "window"]),
}
FEATURE_DIM = 64
TAG_ACCURACY = 0.8  # how often the simulated detector's top-1 class is right


def plural(c):
    return PLURAL.get(c, c + "s")


def things(scene):
    """The scene's objects, without the background regions (road, sky, ...)."""
    return [o for o in scene["objects"] if not o.get("background")]


def write_lines(path, lines):
    """A text file of `lines`, never half written (common.write_atomic)."""
    write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"), "w")


class ToyWorld:
    """Draws scenes and what a detector and people would say about them. Deterministic from seed."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        g = np.random.default_rng(seed + 1)  # the detector's feature space, fixed per world
        unit = lambda n, scale: scale * g.standard_normal((n, FEATURE_DIM)) / np.sqrt(FEATURE_DIM)
        self.group_vec = dict(zip(GROUPS, unit(len(GROUPS), 2.0)))
        self.class_vec = unit(len(CLASSES), 1.5)
        self.color_vec = unit(len(COLORS), 1.0)
        self.size_vec = unit(len(SIZES), 0.5)

    def scene(self, kind=None, classes=None):
        """Ground truth: a scene type and 3-6 objects with class, colour, size and a pixel box."""
        r = self.rng
        kind = kind or r.choice(list(SCENES))
        groups, background = SCENES[kind]
        W, H = 640, 480
        if classes is None:
            classes = [r.choice(GROUPS[r.choice(groups)]) for _ in range(r.integers(3, 7))]
        objects = []
        for c in classes:
            size = r.choice(SIZES)
            w, h = (r.uniform(0.1, 0.25, 2) if size == "small" else r.uniform(0.3, 0.5, 2)) * (W, H)
            x, y = r.uniform(0, W - w), r.uniform(0, H - h)
            objects.append({"class": str(c), "color": str(r.choice(COLORS)), "size": str(size),
                            "box": [round(float(v), 1) for v in (x, y, x + w, y + h)]})
        for c in background:  # stuff regions: detected and tagged, seldom talked about
            objects.append({"class": c, "color": str(r.choice(COLORS)), "size": "large", "background": True,
                            "box": [0.0, 0.0 if c in ("sky", "wall", "window") else H / 2, float(W),
                                    H / 2 if c in ("sky", "wall", "window") else float(H)]})
        return {"kind": str(kind), "width": W, "height": H, "objects": objects}

    def detect(self, scene):
        """What a detector gives for a scene: per region a box, a feature, a top-1 tag, a confidence
        and an attribute (the colour). Boxes jitter; tags are wrong 1 time in 5, within the group."""
        r, W, H = self.rng, scene["width"], scene["height"]
        feats, boxes, labels, scores, attrs, attr_scores = [], [], [], [], [], []
        for o in scene["objects"]:
            c, col = CLASSES.index(o["class"]), COLORS.index(o["color"])
            x1, y1, x2, y2 = o["box"]
            j = r.normal(0, 0.05, 4) * (x2 - x1, y2 - y1, x2 - x1, y2 - y1)
            box = np.clip(np.array([x1, y1, x2, y2]) + j, 0, [W, H, W, H]) / [W, H, W, H]
            f = self.group_vec[GROUP_OF[o["class"]]] + self.class_vec[c] + self.color_vec[col] \
                + self.size_vec[SIZES.index(o["size"])] + r.normal(0, 0.4, FEATURE_DIM) / np.sqrt(FEATURE_DIM) * 4
            right = r.random() < TAG_ACCURACY
            tag = c if right else CLASSES.index(r.choice([x for x in GROUPS[GROUP_OF[o["class"]]] if x != o["class"]]))
            attr_right = r.random() < 0.8
            feats.append(np.maximum(f, 0))  # ReLU'd like a real box head's output
            boxes.append(box)
            labels.append(tag)
            scores.append(r.uniform(0.5, 1.0) if right else r.uniform(0.2, 0.7))
            attrs.append(col if attr_right else r.integers(len(COLORS)))
            attr_scores.append(r.uniform(0.5, 1.0) if attr_right else r.uniform(0.2, 0.6))
        return dict(features=np.array(feats), boxes=np.array(boxes), labels=np.array(labels), scores=np.array(scores),
                    attributes=np.array(attrs), attr_scores=np.array(attr_scores), width=W, height=H)

    # -- language about scenes ------------------------------------------------

    def caption(self, scene):
        r, objects = self.rng, things(scene)
        a, b = (objects[i] for i in r.choice(len(objects), 2, replace=False))
        # the classes in scene order: a set's order changes with PYTHONHASHSEED, and so did the captions
        counts = {c: sum(o["class"] == c for o in objects) for c in dict.fromkeys(o["class"] for o in objects)}
        many = [c for c, n in counts.items() if n > 1]
        form = r.integers(5)
        if form == 0:
            return f"a {a['color']} {a['class']} {relation(a, b)} a {b['size']} {b['class']} ."
        if form == 1:
            return f"a {a['size']} {a['color']} {a['class']} in a {scene['kind']} ."
        if form == 2 and many:
            c = r.choice(many)
            return f"{NUMBERS[counts[c]]} {plural(c)} and a {b['color']} {b['class']} in the {scene['kind']} ."
        if form == 3:
            return f"there is a {a['color']} {a['class']} and a {b['color']} {b['class']} ."
        return f"a {a['class']} {relation(a, b)} the {b['color']} {b['class']} in a {scene['kind']} ."

    def sentence(self, group):
        """General text: the object words used outside captions, in contexts shared by a group,
        so that text alone can learn that a truck is like a car."""
        r = self.rng
        x, y = r.choice(GROUPS[group]), r.choice(GROUPS[r.choice(list(GROUPS))])
        t = r.choice(GENERAL_TEXT[group] + GENERAL_TEXT["any"])
        return t.format(x=x, xs=plural(x), y=y, ys=plural(y), color=r.choice(COLORS), size=r.choice(SIZES))

    def document(self):
        group = self.rng.choice([g for g in GROUPS if g != "background"])
        return [self.sentence(group) for _ in range(self.rng.integers(3, 8))]


GENERAL_TEXT = {
    "vehicle": ["the {x} stopped at the traffic light .", "he bought a new {x} last year .",
                "she drove the {x} to work .", "the {x} was parked outside the station .",
                "a {x} needs fuel to run .", "they washed the {x} in the driveway ."],
    "animal": ["the {x} was hungry and wanted food .", "a {x} is an animal that lives on a farm .",
               "the vet looked at the sick {x} .", "the {x} slept in the sun all day .",
               "children like to feed the {x} .", "the {x} ran across the field ."],
    "kitchenware": ["she washed the {x} after dinner .", "put the {x} back in the cupboard .",
                    "the {x} fell and made a loud noise .", "he set the {x} on the kitchen counter .",
                    "a clean {x} was next to the sink ."],
    "food": ["the {x} tasted sweet and fresh .", "he ate a {x} for lunch .", "she bought a {x} at the market .",
             "the {x} was still warm from the oven .", "kids love to eat {xs} ."],
    "furniture": ["they moved the {x} into the new house .", "the old {x} is made of wood .",
                  "she sat down near the {x} .", "the {x} was too heavy to carry .",
                  "we painted the {x} last summer ."],
    "person": ["the {x} walked to work in the morning .", "a {x} said hello to the neighbours .",
               "the {x} laughed at the joke .", "the {x} was reading a book .", "a young {x} waved from the window ."],
    "any": ["the {x} was {color} and {size} .", "a {size} {x} is not like a {y} .",
            "the {x} and the {y} were both {color} .", "there was a {color} {x} in the picture .",
            "how many {xs} did you see ?", "what color is your {x} ?", "is there a {x} in the house ?",
            "what is next to the {y} ?", "we saw two {xs} and three {ys} ."],
}


def relation(a, b):
    """Where a is relative to b, from their box centres."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a["box"], b["box"]
    dx, dy = (ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def make_toy_world(root=TOY_DIR, seed=0, scale=1.0, log=print):
    """Write the toy world under `root` (skipped if it is already there). `scale` shrinks it for tests.

    root/vocab.txt                         the WordPiece vocabulary, a copy of toy_vocab.txt
    root/scenes.json                       ground truth of every scene, by image id
    root/features/{pretrain,extra,heldout,vqa,nlvr2,flickr30k,refcoco}   feature stores
    root/pretrain/captions.txt             captions of *other* scenes than the pretrain images (unaligned)
    root/pretrain/pairs.jsonl              {"image_id", "caption"}: the pretrain images' own captions (aligned)
    root/pretrain/text.txt                 general text, a sentence per line, blank line between documents
    root/heldout/{captions.txt,text.txt}   the same, never trained on, for held-out losses
    root/tasks/...                         VQA v2, NLVR2, Flickr30K (Karpathy) and RefCOCO+ (UNC) files
    """
    if os.path.exists(os.path.join(root, "done")):
        return make_later_corpora(root, seed)
    n = lambda k: max(4, int(k * scale))
    world, scenes = ToyWorld(seed), {}
    os.makedirs(os.path.join(root, "pretrain"), exist_ok=True)
    os.makedirs(os.path.join(root, "heldout"), exist_ok=True)

    def store(name, items):  # items: (image_id, scene); writes a feature store of their detections
        w = FeatureWriter(os.path.join(root, "features", name), FEATURE_DIM, CLASSES, attr_names=COLORS,
                          extractor={"detector": "toy world simulated detector", "seed": seed}, shard_size=2000)
        for image_id, s in items:
            scenes[image_id] = s
            d = world.detect(s)
            w.add(image_id, d["features"], d["boxes"], d["labels"], d["scores"], d["width"], d["height"],
                  d["attributes"], d["attr_scores"])
        w.close()

    def text(n_docs):
        return [line for _ in range(n_docs) for line in world.document() + [""]]

    # pre-training corpora: images, captions of other scenes, aligned pairs, general text
    images = [(f"pt{i:06d}", world.scene()) for i in range(n(6000))]
    store("pretrain", images)
    store("extra", [(f"ex{i:06d}", world.scene()) for i in range(n(3000))])
    write_lines(os.path.join(root, "pretrain", "captions.txt"),
                [world.caption(world.scene()) for _ in range(n(6000))])
    write_lines(os.path.join(root, "pretrain", "pairs.jsonl"),
                [json.dumps({"image_id": i, "caption": world.caption(s)}) for i, s in images])
    write_lines(os.path.join(root, "pretrain", "text.txt"), text(n(3000)))
    store("heldout", [(f"ho{i:06d}", world.scene()) for i in range(n(300))])
    write_lines(os.path.join(root, "heldout", "captions.txt"),
                [world.caption(world.scene()) for _ in range(n(300))])
    write_lines(os.path.join(root, "heldout", "text.txt"), text(n(150)))

    make_toy_tasks(world, root, n, store)

    shutil.copyfile(VOCAB, os.path.join(root, "vocab.txt"))  # the same pieces for every seed and scale
    write_json(os.path.join(root, "scenes.json"), scenes)
    make_later_corpora(root, seed)
    open(os.path.join(root, "done"), "w").close()
    log(f"toy world written to {root}/: {len(scenes)} scenes")
    return root


def train_vocab(root, out=VOCAB):
    """How toy_vocab.txt was made: WordPiece trained on every word of the toy world at `root` (seed 0),
    as BERT's covers all of English. The trainer breaks ties between equally frequent merges in an
    order that changes from process to process (tokenizers issue 1794), so two trainings differ in a
    few pieces, and every figure downstream with them: it ran once and its output is kept. Run it
    again (python toy.py --train-vocab) after changing the toy world's words."""
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=True)
    words = [" ".join(CLASSES + COLORS + SIZES + NUMBERS + list(SCENES) + [plural(c) for c in CLASSES])]
    questions = os.path.join(root, "tasks", "vqa", "v2_OpenEnded_mscoco_train2014_questions.json")
    words += [q["question"] for q in read_json(questions)["questions"]]
    for f in ("text.txt", "captions.txt"):
        with open(os.path.join(root, "pretrain", f)) as lines:
            words += lines.read().splitlines()
    tok.train_from_iterator(words, vocab_size=500, min_frequency=2, show_progress=False,
                            special_tokens=list(Vocab.RESERVED))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    for path in (out, os.path.join(root, "vocab.txt")):
        write_lines(path, pieces)
    return out


# The U_SBU row of the paper pre-trains on Conceptual Captions images with SBU captions: captions
# that users wrote for other photos (Flickr), in other words. Its miniature: captions in a second
# style (plain sentences, words of the general text) of scenes drawn with other scene-type
# proportions (more outdoor photos), never of the pre-training images.
SBU_KINDS = {"street": 0.35, "farm": 0.35, "living room": 0.15, "kitchen": 0.05, "dining room": 0.10}
SBU_TEMPLATES = ["we saw a {a[color]} {a[class]} and a {b[class]} .", "the {a[class]} was {a[color]} and {a[size]} .",
                 "a {a[class]} near the {b[class]} in the {kind} .",
                 "there was a {a[size]} {a[class]} next to the {b[class]} .",
                 "she saw a {a[color]} {a[class]} in the picture ."]


def sbu_caption(r, scene):
    objects = things(scene)
    a, b = (objects[i] for i in r.choice(len(objects), 2, replace=False))
    return SBU_TEMPLATES[r.integers(len(SBU_TEMPLATES))].format(a=a, b=b, kind=scene["kind"])


def make_later_corpora(root, seed=0):
    """Files added to the toy world after its first version, each from its own random stream, so
    that a world made before them gains them unchanged and nothing else in it moves:
    root/pretrain/captions_sbu.txt  the U_SBU row's captions (above), as many as captions.txt
    root/heldout/pairs.jsonl        the held-out images with a caption each, for the held-out match accuracy"""
    sbu, pairs = os.path.join(root, "pretrain", "captions_sbu.txt"), os.path.join(root, "heldout", "pairs.jsonl")
    if os.path.exists(sbu) and os.path.exists(pairs):
        return root
    world = ToyWorld(seed)
    world.rng = r = np.random.default_rng([seed, 2021])
    with open(os.path.join(root, "pretrain", "captions.txt")) as f:
        count = sum(1 for line in f if line.strip())
    kinds = list(SBU_KINDS)
    write_lines(sbu, [sbu_caption(r, world.scene(kinds[r.choice(len(kinds), p=list(SBU_KINDS.values()))]))
                      for _ in range(count)])
    heldout = FeatureStore(os.path.join(root, "features", "heldout")).ids()
    scenes = read_json(os.path.join(root, "scenes.json"))
    write_lines(pairs, [json.dumps({"image_id": i, "caption": world.caption(scenes[i])}) for i in heldout])
    return root


def make_toy_tasks(world, root, n, store):
    """The four downstream tasks on fresh scenes, each in its real dataset's file format (docs/METHOD.md §7);
    n(k) scales a count, store(name, [(image_id, scene)]) writes a feature store."""
    for make in (toy_vqa, toy_nlvr2, toy_flickr30k, toy_refcoco):
        make(world, os.path.join(root, "tasks"), n, store)


def toy_vqa(world, tasks, n, store):
    """VQA v2: questions and annotations files, 10 answers per question, COCO-style integer image ids."""
    r = world.rng
    os.makedirs(os.path.join(tasks, "vqa"), exist_ok=True)
    qid = 0
    for split, first_id, count in (("train2014", 100000, n(2000)), ("val2014", 200000, n(500))):
        items = [(str(first_id + i), world.scene()) for i in range(count)]
        store(f"vqa_{split[:-4]}", items)
        questions, annotations = [], []
        for image_id, s in items:
            for qtype, atype, question, answer, options in toy_questions(r, s):
                qid += 1
                answers = [answer if r.random() < 0.9 else str(r.choice(options)) for _ in range(10)]
                questions.append({"image_id": int(image_id), "question": question, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": int(image_id), "question_type": qtype,
                                    "answer_type": atype,
                                    "multiple_choice_answer": max(dict.fromkeys(answers), key=answers.count),
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                for k, a in enumerate(answers)]})
        write_json(os.path.join(tasks, "vqa", f"v2_OpenEnded_mscoco_{split}_questions.json"),
                   {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "questions": questions})
        write_json(os.path.join(tasks, "vqa", f"v2_mscoco_{split}_annotations.json"),
                   {"data_type": "mscoco", "data_subtype": split, "annotations": annotations})


def toy_nlvr2(world, tasks, n, store):
    """NLVR2: JSON lines; each sentence is judged against 2 image pairs, named from the identifier."""
    os.makedirs(os.path.join(tasks, "nlvr2"), exist_ok=True)
    for split, count in (("train", n(1500)), ("dev", n(300)), ("test1", n(300))):
        lines, items = [], []
        for k in range(count):
            sentence, make_pair = toy_nlvr2_sentence(world)
            for p in range(2):
                label = bool(world.rng.random() < 0.5)
                left, right = make_pair(label)
                items += [(f"{split}-{k}-{p}-img0", left), (f"{split}-{k}-{p}-img1", right)]
                lines.append(json.dumps({"identifier": f"{split}-{k}-{p}-0", "sentence": sentence,
                                         "label": str(label)}))
        store(f"nlvr2_{split}", items)
        write_lines(os.path.join(tasks, "nlvr2", f"{split}.json"), lines)


def toy_flickr30k(world, tasks, n, store):
    """Flickr30K, Karpathy's split file: 5 captions per image."""
    os.makedirs(os.path.join(tasks, "flickr30k"), exist_ok=True)
    images, items = [], []
    for split, count in (("train", n(1000)), ("val", n(100)), ("test", n(100))):
        for _ in range(count):
            i, s = len(images), world.scene()
            items.append((str(700000 + i), s))
            sents = [world.caption(s) for _ in range(5)]
            images.append({"filename": f"{700000 + i}.jpg", "imgid": i, "split": split,
                           "sentids": list(range(5 * i, 5 * i + 5)),
                           "sentences": [{"raw": c, "tokens": c.replace(" .", "").split(), "imgid": i,
                                          "sentid": 5 * i + j} for j, c in enumerate(sents)]})
    store("flickr30k", items)
    write_json(os.path.join(tasks, "flickr30k", "dataset_flickr30k.json"), {"dataset": "flickr30k", "images": images})


def toy_refcoco(world, tasks, n, store):
    """RefCOCO+ (UNC): refs(unc).p and COCO instances.json; testA refers to people, testB to objects."""
    r = world.rng
    os.makedirs(os.path.join(tasks, "refcoco+"), exist_ok=True)
    refs, coco_images, annotations, items = [], [], [], []
    for split, count in (("train", n(1500)), ("val", n(300)), ("testA", n(300)), ("testB", n(300))):
        made = 0
        while made < count:
            training = split in ("train", "val")
            s = toy_refcoco_scene(world, people=split == "testA" or (training and r.random() < 0.5))
            image_id = 300000 + len(coco_images)
            targets = [o for o in things(s) if (GROUP_OF[o["class"]] == "person") == (split != "testB") or training]
            o = targets[r.integers(len(targets))]
            expression = referring_expression(o, things(s))
            if expression is None:
                continue
            made += 1
            items.append((str(image_id), s))
            coco_images.append({"id": image_id, "width": s["width"], "height": s["height"],
                                "file_name": f"COCO_train2014_{image_id:012d}.jpg"})
            for obj in things(s):
                x1, y1, x2, y2 = obj["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": CLASSES.index(obj["class"]) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                if obj is o:
                    ann_id = annotations[-1]["id"]
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": split,
                         "category_id": CLASSES.index(o["class"]) + 1,
                         "sent_ids": [len(refs)], "file_name": coco_images[-1]["file_name"],
                         "sentences": [{"sent": expression, "raw": expression, "tokens": expression.split(),
                                        "sent_id": len(refs)}]})
    store("refcoco", items)
    import pickle
    with open(os.path.join(tasks, "refcoco+", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    write_json(os.path.join(tasks, "refcoco+", "instances.json"), {
        "images": coco_images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": GROUP_OF[c]} for i, c in enumerate(CLASSES)]})


def toy_questions(r, s):
    """(question_type, answer_type, question, answer, wrong-answer options) about a scene."""
    objs = things(s)
    counts = {c: sum(o["class"] == c for o in objs) for c in CLASSES}
    unique = [o for o in objs if counts[o["class"]] == 1]
    out = []
    if unique:
        o = unique[r.integers(len(unique))]
        out.append(("what color is the", "other", f"what color is the {o['class']}?", o["color"], COLORS))
    c = r.choice([o["class"] for o in objs] + list(GROUPS[GROUP_OF[objs[0]["class"]]]))
    out.append(("how many", "number", f"how many {plural(c)} are there?", str(counts[c]), ["0", "1", "2", "3", "4"]))
    present = r.random() < 0.5
    group = GROUPS[GROUP_OF[objs[r.integers(len(objs))]["class"]]]
    pool = [x for x in group if (counts[x] > 0) == present] or [x for x in group]
    c = r.choice(pool)
    out.append(("is there a", "yes/no", f"is there a {c} in the picture?", "yes" if counts[c] else "no", ["yes", "no"]))
    if len(unique) >= 2:
        i, j = r.choice(len(unique), 2, replace=False)
        a, b = unique[i], unique[j]
        out.append(("what is", "other", f"what is {relation(a, b)} the {b['class']}?", a["class"],
                    CLASSES[:-len(GROUPS['background'])]))
    return out


def toy_nlvr2_sentence(world):
    """A statement about two images, and a function that draws a (left, right) scene pair for
    which the statement is true or false, as asked."""
    r = world.rng
    kind = r.choice(list(SCENES))
    c = r.choice(GROUPS[r.choice(SCENES[kind][0])])
    color, count = r.choice(COLORS), int(r.integers(1, 4))

    def scene(copies, col=None):  # a scene of this kind with `copies` objects of class c
        others = [x for x in (r.choice(GROUPS[r.choice(SCENES[kind][0])]) for _ in range(r.integers(2, 4))) if x != c]
        s = world.scene(kind, classes=others + [c] * copies)
        for o in s["objects"]:
            if o["class"] == c and col is not None:
                o["color"] = col
            elif o["class"] == c and o["color"] == color:  # keep "a {color} {c}" under control
                o["color"] = r.choice([x for x in COLORS if x != color])
        return s

    form = r.integers(4)
    if form == 0:
        sentence = f"there is a {c} in the left image ."
        pair = lambda t: (scene(int(r.integers(1, 3)) if t else 0), scene(int(r.integers(0, 2))))
    elif form == 1:
        sentence = f"both images contain a {c} ."
        pair = lambda t: ((scene(1), scene(1)) if t else
                          (scene(1), scene(0)) if r.random() < 0.5 else (scene(0), scene(1)))
    elif form == 2:
        sentence = (f"there {'is' if count == 1 else 'are'} exactly {NUMBERS[count]} {c if count == 1 else plural(c)} "
                    "in the left image .")
        pair = lambda t: (scene(count if t else int(r.choice([x for x in (count - 1, count + 1) if x >= 0]))),
                          scene(int(r.integers(0, 3))))
    else:
        sentence = f"the right image has a {color} {c} ."
        pair = lambda t: (scene(int(r.integers(0, 2))), scene(1, color) if t else scene(int(r.integers(0, 2))))
    return sentence, pair


def toy_refcoco_scene(world, people):
    """A scene with look-alike distractors: two classes, two or three objects of each."""
    r = world.rng
    kind = r.choice(["street", "farm", "living room"] if people else ["kitchen", "dining room", "street", "farm"])
    groups = [g for g in SCENES[kind][0] if (g == "person") == people] or SCENES[kind][0]
    a = r.choice(GROUPS["person"] if people else GROUPS[r.choice(groups)])
    b = r.choice(GROUPS[r.choice(SCENES[kind][0])])
    return world.scene(kind, classes=[a] * int(r.integers(2, 4)) + [b] * int(r.integers(1, 3)))


def referring_expression(o, objects):
    """The shortest description that fits `o` and no other object (RefCOCO+ has no location words)."""
    for keys in (["class"], ["color", "class"], ["size", "class"], ["size", "color", "class"]):
        if sum(all(x[k] == o[k] for k in keys) for x in objects) == 1:
            return "the " + " ".join(o[k] for k in keys)
    return None


def draw_scene(root, image_id, out_png):
    """Look at a toy scene: its objects as coloured boxes, the detector's tags and scores, and a
    caption, in a PNG."""
    from PIL import Image, ImageDraw
    with open(os.path.join(root, "scenes.json")) as f:
        scene = json.load(f).get(image_id)
    if scene is None:
        raise KeyError(f"{root}/scenes.json: no scene {image_id!r}")
    stores = [FeatureStore(os.path.join(root, "features", n)) for n in os.listdir(os.path.join(root, "features"))]
    det = next(s for s in stores if image_id in s)[image_id]
    W, H = scene["width"], scene["height"]
    rgb = {"red": (220, 50, 50), "blue": (60, 90, 220), "green": (60, 170, 80), "yellow": (230, 200, 40),
           "black": (30, 30, 30), "white": (245, 245, 245), "brown": (140, 90, 50), "gray": (150, 150, 150)}
    img = Image.new("RGB", (W, H + 40), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in sorted(scene["objects"], key=lambda o: not o.get("background")):  # background first
        draw.rectangle(o["box"], fill=rgb[o["color"]] if not o.get("background") else None, outline=(200, 200, 200))
    for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
        x1, y1, x2, y2 = box * [W, H, W, H]
        draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 255), width=2)
        text = f"{CLASSES[label]} {score:.2f}"
        draw.rectangle(draw.textbbox((x1 + 3, y1 + 2), text), fill=(255, 255, 255))
        draw.text((x1 + 3, y1 + 2), text, fill=(200, 0, 200))
    draw.text((8, H + 12), ToyWorld(zlib.crc32(image_id.encode())).caption(scene), fill=(0, 0, 0))
    img.save(out_png)
    return out_png


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Make the toy world, or draw one of its scenes.")
    p.add_argument("--root", default=TOY_DIR, help="where the toy world lives")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", metavar="IMAGE_ID", help="draw this scene (e.g. pt000000) to IMAGE_ID.png")
    p.add_argument("--train-vocab", action="store_true",
                   help=f"train the vocabulary again on this world's words, into {os.path.basename(VOCAB)} "
                        "(after changing them)")
    args = p.parse_args()
    make_toy_world(args.root, args.seed)
    if args.train_vocab:
        print("wrote", train_vocab(args.root))
    if args.show:
        print("wrote", draw_scene(args.root, args.show, f"{args.show}.png"))

