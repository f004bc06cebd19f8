"""
The paper's four downstream tasks (docs/METHOD.md §6), for finetune.py and ask.py: VQA 2.0, NLVR2,
Flickr30K retrieval and RefCOCO+.

The file reads from the top: the metrics (each against the official definition), the loaders of
the real file formats, and the four tasks. Each task is a small class in two parts: its model part
(the model's inputs, head, forward passes and loss), built from what a fine-tuned checkpoint holds,
which is all ask.py needs; and its data part, load_data, which reads the task's files and scores
each evaluated item and a trivial baseline's guess at it. finetune.py trains any of them with one
loop and turns the scores into metrics (analysis.py: also over the rare and the common items).
"""

import json
import math
import os
import pickle
import re
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import storage
from common import print0
from model import INPUTS

# -----------------------------------------------------------------------------
# metrics

# VQA answer normalisation, as the official evaluation (vqaEval.py of the VQA API) does it:
# punctuation, then number words to digits, articles dropped, contractions given their apostrophes.
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# the official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped and never applies, so a
# period goes unless a digit follows it ("2.5" stays, "dog." loses it)
PERIOD = re.compile(r"\.(?!\d)")
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
# the official table spells each form with any one of its apostrophes missing: "couldnt've" and
# "couldn'tve" -> "couldn't've", "dont" -> "don't". (Its I-forms, "Im", "Ive", "Id've", have capitals
# and never match lower-cased text, so they are left out.)
CONTRACTIONS = {c[:i] + c[i + 1:]: c for c in CONTRACTED for i, ch in enumerate(c) if ch == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table has this one backwards


def process_punctuation(text):
    """Official: a punctuation mark next to a space (or any, when the text has a comma between
    digits, "1,000") is deleted, one between two characters becomes a space ("red-and-white")."""
    out = text
    delete = COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCT:
        out = out.replace(mark, "" if delete or mark + " " in text or " " + mark in text else " ")
    return PERIOD.sub("", out)


def process_digit_article(text):
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def clean_answer(answer):
    """The official first step on every answer: newlines and tabs to spaces, stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer):
    """An answer as compared when annotators disagree: "Two dogs!" -> "2 dogs"."""
    return process_digit_article(process_punctuation(clean_answer(answer)))


def as_compared(gt_answers):
    """The annotators' answers as the official evaluation (since its 2021 fix) compares them, and what
    it does to the prediction: both normalised when the annotators disagree, both only cleaned when all
    agree ("two" does not match ten "2"s, nor "Yes" ten "yes")."""
    gts = [clean_answer(a) for a in gt_answers]
    norm = normalize_answer if len(set(gts)) > 1 else clean_answer
    return [norm(a) for a in gts], norm


def vqa_accuracy(pred, gt_answers):
    """The official VQA accuracy of one predicted answer: over the 10 ways of leaving one annotator
    out, the mean of min(1, matches among the other 9 / 3)."""
    gts, norm = as_compared(gt_answers)
    pred = norm(pred)
    others_agreeing = [sum(g == pred for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
    return sum(min(1.0, k / 3) for k in others_agreeing) / len(gts)


def soft_score(k, n=10):
    """vqa_accuracy of an answer that k of n annotators gave; for n = 10 it is min(1, 0.3 k) (docs/METHOD.md
    §6): 0, 0.3, 0.6, 0.9, then 1."""
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


def recall_at_k(scores, gold, ks=(1, 5, 10), per_item=False):
    """Image retrieval. scores (M, N): caption m against image n; gold (M,): each caption's image.
    R@K is the share of captions whose image is among the K best; a tie counts against it. per_item:
    each caption's hit (M,) instead of the share."""
    g = scores.gather(1, gold[:, None])  # (M, 1)
    rank = (scores >= g).sum(1) - 1  # (M,) other images scoring at least as high
    if per_item:
        return {f"R@{k}": (rank < k).double().numpy() for k in ks}
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def box_iou(a, b):
    """Intersection over union of boxes x1, y1, x2, y2 (..., 4), broadcast against each other."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter = (np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2])).clip(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clip(min=0).prod(-1)
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def consistency(keys, correct):
    """NLVR2: the share of unique sentences (the identifier without its pair index) whose every example is right."""
    ok = {}
    for k, c in zip(keys, correct):
        ok[k] = ok.get(k, True) and bool(c)
    return sum(ok.values()) / max(1, len(ok))


# -----------------------------------------------------------------------------
# loaders of the real file formats (docs/METHOD.md §7). Each names the file and the record on a bad input: a
# malformed record (a missing field, an unknown split, a question without its annotation) is skipped and
# counted, unless more than storage.MAX_BAD_SHARE of its file is (then the file is not what it should be and
# the run stops); a record whose image has no features is skipped and counted, unless none is left.


def field(record, name, file, where):
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{file}: {where} has no field {name!r}")
    return record[name]


class Skipped:
    """Records left out, malformed or naming an image that has no features: a count per file and the
    first such record, said at the start and at the end of the run and written to results.json."""

    def __init__(self):
        self.files = {}  # file -> [count, the first record and why]
        self.malformed = {}  # file -> [count, the first one's error]

    def add(self, file, where, candidates, images):
        first = (f"{where}: its image has no features in {', '.join(s.path for s in images.stores)} "
                 f"(looked for {', '.join(map(repr, candidates))})")
        self.files.setdefault(file, [0, first])[0] += 1

    def bad(self, file, error):
        """A malformed record; error: the ValueError naming the file and the record."""
        self.files.setdefault(file, [0, str(error).removeprefix(f"{file}: ")])[0] += 1
        self.malformed.setdefault(file, [0, str(error)])[0] += 1

    def check(self, file, total):
        """ValueError when more than storage.MAX_BAD_SHARE of the file's `total` records were malformed."""
        n, first = self.malformed.get(file, [0, None])
        storage.check_bad_share(n, total, first)

    def lines(self):
        out = []
        for file, (n, first) in self.files.items():
            m, bad = self.malformed.get(file, [0, None])
            mixed = f"; {m} of them malformed, the first: {bad.removeprefix(f'{file}: ')}" if 0 < m < n else ""
            out.append(f"skipped {n} records of {file}: first: {first}{mixed}")
        return out

    def none_left(self, file, what="record"):
        """The error for a split left with nothing to use: the task files and the stores do not fit."""
        n, first = self.files.get(file, [0, None])
        return ValueError(f"{file}: no usable {what}" + (f"; all {n} skipped, first: {first}" if n else ""))


def find_image(images, candidates, file, where, skipped):
    """The first of `candidates` that the feature stores hold; None when none is (the record is
    counted in `skipped`)."""
    for c in candidates:
        if c in images:
            return c
    skipped.add(file, where, candidates, images)
    return None


def coco_ids(image_id):
    """The ids a COCO image can have in a store: its number (toy world, bottom-up TSV imports) or its
    file stem (extract_features.py names images by file)."""
    try:
        n = int(image_id)
    except (TypeError, ValueError):
        return [str(image_id)]
    return [str(image_id)] + [f"COCO_{s}_{n:012d}" for s in ("train2014", "val2014", "test2015")]


def load_vqa(questions_file, annotations_file, images, skipped):
    """VQA v2: a questions file and its annotations -> [{qid, image, text, answers, qtype, mc}]."""
    annotations = field(storage.read_json(annotations_file), "annotations", annotations_file, "the file")
    by_qid = {}
    for n, a in enumerate(annotations):
        try:
            qid = field(a, "question_id", annotations_file, f"record {n}")
            where = f"record {n} (question_id {qid})"
            answers = [field(x, "answer", annotations_file, f"{where}, answer {k},")
                       for k, x in enumerate(field(a, "answers", annotations_file, where))]
            if not answers:
                raise ValueError(f"{annotations_file}: {where} has no answers")
            qtype = field(a, "question_type", annotations_file, where)
        except ValueError as e:
            skipped.bad(annotations_file, e)
            continue
        mc = a.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0]
        by_qid[qid] = {"answers": answers, "qtype": qtype, "mc": mc, "atype": a.get("answer_type", "all")}
    skipped.check(annotations_file, len(annotations))
    out = []
    questions = field(storage.read_json(questions_file), "questions", questions_file, "the file")
    for n, q in enumerate(questions):
        try:
            qid = field(q, "question_id", questions_file, f"record {n}")
            where = f"record {n} (question_id {qid})"
            text, image_id = field(q, "question", questions_file, where), field(q, "image_id", questions_file, where)
            if qid not in by_qid:
                raise ValueError(f"{questions_file}: {where}: {annotations_file} has no annotation for this question")
        except ValueError as e:
            skipped.bad(questions_file, e)
            continue
        image = find_image(images, coco_ids(image_id), questions_file, where, skipped)
        if image is not None:
            out.append({"qid": qid, "image": image, "text": text, **by_qid[qid]})
    skipped.check(questions_file, len(questions))
    if not out:
        raise skipped.none_left(questions_file, "question")
    return out


def nlvr2_record(line, file, n):
    """Line n of an NLVR2 file -> its identifier, where it is, sentence, label, identifier's four parts."""
    try:
        rec = json.loads(line)
    except ValueError:
        raise ValueError(f"{file}: line {n} is not JSON") from None
    ident = field(rec, "identifier", file, f"line {n}")
    where = f"line {n} ({ident})"
    text, label = field(rec, "sentence", file, where), str(field(rec, "label", file, where))
    if label not in ("True", "False"):
        raise ValueError(f"{file}: {where}: label {label!r}, expected 'True' or 'False'")
    parts = str(ident).split("-")
    if len(parts) != 4:
        raise ValueError(f"{file}: {where}: the identifier is not split-set-pair-sentence")
    return ident, where, text, label, parts


def load_nlvr2(file, images, skipped):
    """NLVR2 JSON lines -> [{id, text, images: (img0, img1), label, sentence}]. The images are named
    from the identifier split-set-pair-sentence: split-set-pair-img0 and -img1."""
    try:
        with open(file, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
        raise ValueError(f"{file}: cannot be read as text ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ident, where, text, label, parts = nlvr2_record(line, file, n)
        except ValueError as e:
            skipped.bad(file, e)
            continue
        pair = "-".join(parts[:3])
        img0 = find_image(images, [f"{pair}-img0"], file, where, skipped)
        img1 = find_image(images, [f"{pair}-img1"], file, where, skipped) if img0 else None
        if img1 is not None:
            out.append({"id": ident, "text": text, "images": (img0, img1), "label": int(label == "True"),
                        "sentence": "-".join(parts[:2] + parts[3:])})  # split-set-*-sentence: one per unique sentence
    skipped.check(file, sum(1 for line in lines if line.strip()))
    if not out:
        raise skipped.none_left(file, "example")
    return out


def check_split(split, known, file, where):
    if split not in known:
        raise ValueError(f"{file}: {where}: unknown split {split!r}, expected one of {', '.join(known)}")
    return split


def none_empty(splits, named, file, what, skipped):
    """The splits, unless a split the file names lost every record (no features for its images)."""
    empty = sorted(named - set(splits))
    if empty:
        raise skipped.none_left(file, f"{what} of split {empty[0]!r}")
    return splits


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy(file, images, skipped):
    """Karpathy's split file (Flickr30K, COCO) -> {split: [{image, captions}]}; restval joins train."""
    splits, named = {}, set()
    records = field(storage.read_json(file), "images", file, "the file")
    for n, im in enumerate(records):
        try:
            name = field(im, "filename", file, f"image record {n}")
            where = f"image record {n} ({name})"
            split = check_split(field(im, "split", file, where), KARPATHY_SPLITS, file, where)
            captions = []
            for k, s in enumerate(field(im, "sentences", file, where)):
                raw = isinstance(s, dict) and "raw" in s
                captions.append(s["raw"] if raw else " ".join(field(s, "tokens", file, f"{where}, sentence {k},")))
        except ValueError as e:
            skipped.bad(file, e)
            continue
        split = "train" if split == "restval" else split
        named.add(split)
        image = find_image(images, [os.path.splitext(name)[0]], file, where, skipped)
        if image is not None:
            splits.setdefault(split, []).append({"image": image, "captions": captions})
    skipped.check(file, len(records))
    return none_empty(splits, named, file, "image", skipped)


REF_SPLITS = ("train", "val", "test", "testA", "testB", "testC")


def load_refcoco(refs_file, instances_file, images, skipped):
    """RefCOCO+ (UNC): refs(unc).p and COCO's instances.json -> {split: [{ref_id, image, text, gold,
    size}]}, one example per sentence; gold is the referred box as x1, y1, x2, y2 in pixels."""
    try:
        with open(refs_file, "rb") as f:
            refs = pickle.load(f, encoding="latin1")  # pickled by Python 2; a pickle can run code: load files you trust
    except FileNotFoundError:
        raise FileNotFoundError(f"{refs_file}: not found") from None
    except Exception as e:
        raise ValueError(f"{refs_file}: not a readable pickle ({type(e).__name__}: {e})") from None
    instances = storage.read_json(instances_file)
    boxes = {field(a, "id", instances_file, f"annotation {n}"): field(a, "bbox", instances_file, f"annotation {n}")
             for n, a in enumerate(field(instances, "annotations", instances_file, "the file"))}
    sizes = {field(im, "id", instances_file, f"image {n}"): (field(im, "width", instances_file, f"image {n}"),
                                                             field(im, "height", instances_file, f"image {n}"))
             for n, im in enumerate(field(instances, "images", instances_file, "the file"))}
    splits, named = {}, set()
    for n, ref in enumerate(refs):
        try:
            ref_id = field(ref, "ref_id", refs_file, f"record {n}")
            where = f"record {n} (ref_id {ref_id})"
            split, ann_id, image_id = (field(ref, k, refs_file, where) for k in ("split", "ann_id", "image_id"))
            check_split(split, REF_SPLITS, refs_file, where)
            if ann_id not in boxes:
                raise ValueError(f"{refs_file}: {where}: annotation {ann_id} is not in {instances_file}")
            if image_id not in sizes:
                raise ValueError(f"{refs_file}: {where}: image {image_id} is not in {instances_file}")
            sentences = [field(s, "sent", refs_file, f"{where}, sentence {k},")
                         for k, s in enumerate(field(ref, "sentences", refs_file, where))]
        except ValueError as e:
            skipped.bad(refs_file, e)
            continue
        x, y, w, h = boxes[ann_id]
        named.add(split)
        image = find_image(images, coco_ids(image_id), refs_file, where, skipped)
        if image is None:
            continue
        for text in sentences:
            splits.setdefault(split, []).append({"ref_id": ref_id, "image": image, "text": text,
                                                 "gold": [x, y, x + w, y + h], "size": sizes[image_id]})
    skipped.check(refs_file, len(refs))
    return none_empty(splits, named, refs_file, "expression", skipped)


def frequent(counts, min_count, where="training questions"):
    """The answers counted at least `min_count` times, the most frequent first."""
    answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not answers:
        raise ValueError(f"no answer is given to {min_count} {where}: lower --min-answer-count")
    return answers


def read_answer_set(files, min_count):
    """--answers: VQA annotation files, over which the normalised multiple_choice_answers are counted
    (train + val at 9: the usual 3,129), or one ans2label file {"answer": index} (LXMERT's
    trainval_ans2label.json). Returns (the answers in index order, where they come from)."""
    objs = [storage.read_json(f) for f in files]
    if len(files) == 1 and isinstance(objs[0], dict) and "annotations" not in objs[0]:
        table = objs[0]
        if not table or not all(isinstance(a, str) and type(i) is int for a, i in table.items()) \
                or sorted(table.values()) != list(range(len(table))):
            raise ValueError(f"{files[0]}: not a VQA annotations file, nor an ans2label file "
                             f"{{\"answer\": index}} with the indices 0 to N-1")
        return sorted(table, key=table.get), f"read from {files[0]}"
    counts = Counter()
    for f, obj in zip(files, objs):
        if not isinstance(obj, dict) or "annotations" not in obj:
            raise ValueError(f"{f}: not a VQA annotations file (no 'annotations'); an ans2label file goes alone")
        for n, a in enumerate(field(obj, "annotations", f, "the file")):
            counts[normalize_answer(str(field(a, "multiple_choice_answer", f, f"record {n}")))] += 1
    where = f"questions of {' '.join(files)}"
    return frequent(counts, min_count, where), f"each the answer of >= {min_count} {where}"


# -----------------------------------------------------------------------------
# the tasks. Each is one class in two parts:
#   its model part, built from what a finetune.py checkpoint holds and nothing else (the vocabulary, the
#     detector's class names, the settings; VQA's answers): the model's inputs, the head, the forward
#     passes and the loss. ask.py builds this part alone.
#   its data part, load_data(args, images, root): the benchmark files read into .splits, .train (the
#     training examples) and .eval_splits; what each evaluated item scores (item_scores) and what a
#     trivial baseline scores (baseline_scores), per item. finetune.py turns these into the metrics.
# A training step is task.draw(items, gen) on the global batch, then task.loss(model, head, items)
# on this process's share of it (all of it with one process): the mean over those items.

def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def train_subset(n, fraction):
    """--train-fraction: the first ceil(fraction * n) of range(n) in one fixed random order (not
    --seed's), sorted; as every fraction takes a beginning of the same order, the subsets nest."""
    return np.sort(np.random.default_rng(2021).permutation(n)[:max(1, math.ceil(fraction * n - 1e-9))])


def steps_per_epoch(args, task):
    return max(1, len(task.train) // args.batch_size)  # the last partial batch is dropped


def accuracy(hits):
    return {"accuracy": float(np.mean(hits))}


def mlp_head(model, d_in, d_out):
    """Linear(d_in, 2H), GELU, LayerNorm, Linear(2H, d_out): VQA's head (docs/METHOD.md §6), and NLVR2's on
    the two pooled outputs side by side (d_in 2H, as LXMERT's)."""
    H, eps = model.cfg.hidden, model.cfg.ln_eps
    return nn.Sequential(nn.Linear(d_in, 2 * H), nn.GELU(), nn.LayerNorm(2 * H, eps=eps), nn.Linear(2 * H, d_out))


class Task:
    """What the four tasks share: making the model's inputs (the model part); reading, training on and
    scoring the splits (the data part)."""

    max_len = 20  # text pieces, [CLS] and [SEP] included
    unit = "examples"  # what a split is a list of

    # the model part: from what a checkpoint holds, no file read

    def __init__(self, args, vocab, class_names):
        self.vocab, self.class_names, self.tags = vocab, class_names, not args.no_tags
        self.tag_pieces = vocab.tag_pieces(class_names)
        self.eval_batch_size, self.device = args.eval_batch_size, torch.device("cpu")
        self.images = {}  # image id -> its features: load_data's feature stores, or the images ask.py is given

    def tokenize(self, items):
        for x, ids in zip(items, self.vocab.encode_batch([x["text"] for x in items])):
            x["ids"] = ids

    def encode(self, texts, image_ids):
        """Texts (pieces) and image ids -> the model's inputs, [text ; tags ; regions] (docs/METHOD.md §1)."""
        b = data.text_inputs(texts, self.vocab, self.max_len)
        b.update(data.image_inputs([self.images[i] for i in image_ids], self.tag_pieces, self.tags))
        return {k: b[k].to(self.device, non_blocking=True) for k in INPUTS if k in b}

    def pooled(self, model, texts, image_ids):
        h, _ = model(**self.encode(texts, image_ids))
        return model.pool(h)  # (B, H)

    # the data part (finetune.py): the files, training and scoring

    def load_data(self, args, images, root):
        """Read the task's files under `root`, their images from `images` (data.Images): each task reads
        its own after this."""
        self.images, self.info = images, []  # info: lines said at the start
        self.skipped, self.notes = Skipped(), []  # records left out; notes for self.warnings()

    def keep_train(self, fraction):
        """Train on a fraction of the training examples (train_subset); the rest of the task stays."""
        n = len(self.train)
        self.train = [self.train[i] for i in train_subset(n, fraction)]
        self.info.append(f"training on {len(self.train)} of {n} training {self.unit} (--train-fraction {fraction:g})")

    def draw(self, items, gen):
        """The step's random choices, made for the whole global batch before it is split among the
        processes, so that every process draws the same (retrieval: the negatives). Most tasks have none."""
        return items

    def predict(self, forward, model, head, split, size=None):
        """The argmax of forward(model, head, items) for each item of the split, `size` items a pass."""
        batches = chunks(self.splits[split], size or self.eval_batch_size)
        return [k for items in batches for k in forward(model, head, items).argmax(1).tolist()]

    def metrics(self, split, scores):
        """{metric: (N,) per item}, of item_scores or baseline_scores -> the metrics over the split."""
        return {k: float(np.mean(v)) for k, v in scores.items()}

    def texts(self, items):
        """The text of each item, one per scored item (retrieval: per caption): the classes it names make
        the item rare or common (analysis.by_class)."""
        return [x["text"] for x in items]

    def train_texts(self):
        return self.texts(self.train)

    def warnings(self):
        """Said at the start and again at the end, where it is seen."""
        return ["warning: " + line for line in self.skipped.lines()] + self.notes


class VQA(Task):
    """VQA 2.0 (docs/METHOD.md §6): question + tags + regions; an MLP on the pooled output scores every answer."""

    def __init__(self, args, vocab, class_names, answers=None):
        super().__init__(args, vocab, class_names)
        self.answers = answers  # the answer set in index order: a checkpoint's, or counted by load_data

    def make_head(self, model):
        return mlp_head(model, model.cfg.hidden, len(self.answers))

    def logits(self, model, head, items):
        return head(self.pooled(model, [x["ids"] for x in items], [x["image"] for x in items])).float()  # (B, A)

    def loss(self, model, head, items):
        logits = self.logits(model, head, items)
        target = torch.zeros_like(logits)  # (B, A) soft scores
        for i, x in enumerate(items):
            for a, s in x["target"].items():
                target[i, a] = s
        # docs/METHOD.md §6: binary cross-entropy against the soft scores, scaled by the number of answers
        return F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]

    # the data part

    def load_data(self, args, images, root):
        super().load_data(args, images, root)
        files = lambda sub: (os.path.join(root, f"v2_OpenEnded_mscoco_{sub}_questions.json"),
                             os.path.join(root, f"v2_mscoco_{sub}_annotations.json"))
        self.splits = {s: load_vqa(*files(sub), images, self.skipped)
                       for s, sub in (("train", "train2014"), ("val", "val2014"))}
        self.train, self.eval_splits = self.splits["train"], ["val"]
        # the answer set: normalised answers that are the multiple_choice_answer of >= N training
        # questions, or of the questions of --answers, or an ans2label file's
        counts = Counter(normalize_answer(x["mc"]) for x in self.train)
        if args.answers:
            self.answers, source = read_answer_set(args.answers, args.min_answer_count)
        else:
            self.answers = frequent(counts, args.min_answer_count)
            source = f"each the answer of >= {args.min_answer_count} training questions"
        index = {a: i for i, a in enumerate(self.answers)}
        for items in self.splits.values():
            self.tokenize(items)
            for x in items:
                # BCE targets: the official accuracy each answer would get, min(1, 0.3 k) with 10 annotators,
                # the answers normalised (or not) as the official evaluation compares them
                ks = Counter(as_compared(x["answers"])[0])
                x["target"] = {index[a]: soft_score(k, len(x["answers"])) for a, k in ks.items() if a in index}
        self.info.append(f"{len(self.answers)} answers ({source})")
        # a question none of whose answers is in the set stays: the official evaluation counts it (the
        # model scores 0 on it), and it trains every answer's score toward 0
        lost = ", ".join(f"{s} {sum(not x['target'] for x in xs)}/{len(xs)}" for s, xs in self.splits.items())
        self.notes.append(f"questions whose every answer is outside the answer set (kept, with an empty training "
                          f"target): {lost}")
        # baseline: the most frequent answer of each question type in train (of all of train for a new type)
        self.by_type = {}
        for x in self.train:
            self.by_type.setdefault(x["qtype"], Counter())[normalize_answer(x["mc"])] += 1
        self.overall = counts
        self.baseline_name = "most frequent answer per question type"

    def item_scores(self, model, head, split):
        items, pred = self.splits[split], self.predict(self.logits, model, head, split)
        acc = [vqa_accuracy(self.answers[a], x["answers"]) for a, x in zip(pred, items)]
        by_type = {}
        for a, x in zip(acc, items):
            by_type.setdefault(x["atype"], []).append(a)
        print0(f"{split} accuracy by answer type: "
               + ", ".join(f"{t} {np.mean(v):.3f}" for t, v in sorted(by_type.items())))
        return {"accuracy": acc}

    def baseline_scores(self, split):
        guess = lambda x: self.by_type.get(x["qtype"], self.overall).most_common(1)[0][0]
        return {"accuracy": [vqa_accuracy(guess(x), x["answers"]) for x in self.splits[split]]}


class NLVR2(Task):
    """NLVR2 (docs/METHOD.md §6): the sentence with each of its two images, the two pooled outputs side by side,
    an MLP -> true / false."""

    max_len = 32

    def make_head(self, model):
        return mlp_head(model, 2 * model.cfg.hidden, 2)

    def logits(self, model, head, items):
        B = len(items)
        texts = [x["ids"] for x in items] * 2  # each sentence with img0, then with img1: one pass of 2B
        images = [x["images"][0] for x in items] + [x["images"][1] for x in items]
        pooled = self.pooled(model, texts, images)  # (2B, H)
        return head(torch.cat([pooled[:B], pooled[B:]], dim=1)).float()  # (B, 2H) -> (B, 2)

    def loss(self, model, head, items):
        labels = torch.tensor([x["label"] for x in items]).to(self.device, non_blocking=True)
        return F.cross_entropy(self.logits(model, head, items), labels)

    # the data part

    def load_data(self, args, images, root):
        super().load_data(args, images, root)
        files = {s: os.path.join(root, f"{s}.json") for s in ("train", "dev", "test1", "test2")}
        self.splits = {s: load_nlvr2(f, images, self.skipped)
                       for s, f in files.items() if s == "train" or os.path.exists(f)}
        for items in self.splits.values():
            self.tokenize(items)
        self.train = self.splits["train"]
        self.eval_splits = [s for s in ("dev", "test1", "test2") if s in self.splits]
        self.majority = int(np.mean([x["label"] for x in self.train]) >= 0.5)
        self.baseline_name = f"majority class ({bool(self.majority)})"

    def correct(self, split, pred):
        return {"accuracy": [int(guess == x["label"]) for guess, x in zip(pred, self.splits[split])]}

    def metrics(self, split, scores):
        keys = [x["sentence"] for x in self.splits[split]]
        return {**accuracy(scores["accuracy"]), "consistency": consistency(keys, scores["accuracy"])}

    def item_scores(self, model, head, split):  # two sequences an example
        return self.correct(split, self.predict(self.logits, model, head, split, self.eval_batch_size // 2))

    def baseline_scores(self, split):
        return self.correct(split, [self.majority] * len(self.splits[split]))

    # docs/METHOD.md §6: task-specific pre-training, mask-and-predict on NLVR2's own sentences and images. We
    # pair each sentence with one of its two images, drawn at random (it speaks of both), and mask
    # both as in aligned pre-training (docs/METHOD.md §2), without the match loss.
    def pretrain_batch(self, items, rng, attrs):
        """Rows rng.rows of the masked batch of `items` (all of the batch: a region may be replaced by
        one of another row's image)."""
        mine = [items[i] for i in rng.rows]
        pick = (rng.uniform(1)[:, 0] < 0.5).long().tolist()
        b = data.text_inputs([x["ids"] for x in mine], self.vocab, self.max_len)
        b["input_ids"], b["mlm_labels"] = data.mask_text(b["input_ids"], self.vocab, rng)
        b.update(data.image_inputs([self.images[x["images"][k]] for x, k in zip(mine, pick)], self.tag_pieces,
                                   self.tags))
        if not attrs:  # the model has no attribute head of this size
            b.pop("attr_labels", None), b.pop("attr_conf", None)
        return data.mask_image(b, self.vocab, rng, data.donor(self.images, [x["images"][0] for x in items]))


class Retrieval(Task):
    """Flickr30K image retrieval (docs/METHOD.md §6): a score for a caption and an image from the pooled output;
    each positive with two negatives, cross-entropy over the three."""

    max_len = 30  # as captions in pre-training
    unit = "images"

    def make_head(self, model):
        # a linear score on the pooled output, started from the pre-trained match head's "matched
        # minus not matched" (model.nsp, class 0 = matched): the S model's matching carries over
        head = nn.Linear(model.cfg.hidden, 1)
        with torch.no_grad():
            head.weight.copy_(model.nsp.weight[0:1] - model.nsp.weight[1:2])
            head.bias.copy_(model.nsp.bias[0:1] - model.nsp.bias[1:2])
        return head

    def scores(self, model, head, texts, image_ids):
        return head(self.pooled(model, texts, image_ids)).squeeze(-1).float()  # (B,)

    def loss(self, model, head, items):
        B = len(items)
        caps, imgs = [x["ids"] for x in items], [x["image"] for x in items]
        wrong_cap, wrong_img = [x["wrong_cap"] for x in items], [x["wrong_img"] for x in items]
        s = self.scores(model, head, caps + caps + wrong_cap, imgs + wrong_img + imgs)  # (3B,)
        s = s.view(3, B).T  # (B, 3): the positive, its caption with a wrong image, a wrong caption with its image
        return F.cross_entropy(s, torch.zeros(B, dtype=torch.long, device=self.device))

    # the data part

    def load_data(self, args, images, root):
        super().load_data(args, images, root)
        self.splits = load_karpathy(os.path.join(root, "dataset_flickr30k.json"), images, self.skipped)
        missing = [s for s in ("train", "test") if s not in self.splits]
        if missing:
            raise ValueError(f"{root}/dataset_flickr30k.json: no {' or '.join(missing)} images")
        if args.test_images:  # every caption of the first N test images, ranked among those N
            self.splits["test"] = self.splits["test"][: args.test_images]
        for ims in self.splits.values():
            ids = self.vocab.encode_batch([c for im in ims for c in im["captions"]])
            for im in ims:
                im["ids"], ids = ids[: len(im["captions"])], ids[len(im["captions"]):]
        self.eval_splits = ["test"]
        self.info.append("captions (images): " + ", ".join(f"{s} {sum(len(im['ids']) for im in ims)} ({len(ims)})"
                                                           for s, ims in self.splits.items()))
        self.hard = args.hard_negatives
        self.index_train()
        self.baseline_name = "chance, K / number of images"

    def index_train(self):
        """The training captions, each with its image's index k in splits["train"], and which
        detector classes each training image has: how alike two images look, for hard negatives."""
        self.train = [{"ids": c, "image": im["image"], "k": k}
                      for k, im in enumerate(self.splits["train"]) for c in im["ids"]]
        self.tag_sets = np.zeros((len(self.splits["train"]), len(self.class_names)), dtype=bool)  # (N, C)
        for k, im in enumerate(self.splits["train"]):
            self.tag_sets[k, self.images[im["image"]]["labels"]] = True

    def keep_train(self, fraction):
        """A fraction of the training images, with all their captions; negatives come from them alone."""
        self.train = self.splits["train"]  # the images, for Task.keep_train
        super().keep_train(fraction)
        self.splits["train"] = self.train
        self.index_train()

    def negative(self, k, gen, hard):
        """Another training image than k: of `hard` random candidates, the one whose detector tags
        overlap image k's most (Jaccard); with 1 candidate, a random image."""
        n = len(self.splits["train"])
        cand = (k + torch.randint(1, n, (hard,), generator=gen).numpy()) % n  # (C,) never k itself
        t = self.tag_sets
        overlap = (t[cand] & t[k]).sum(1) / np.maximum((t[cand] | t[k]).sum(1), 1)  # (C,)
        return int(cand[overlap.argmax()])

    def draw(self, items, gen):
        train = self.splits["train"]
        # docs/METHOD.md §6: each positive with two negatives, its caption with a wrong image (a tag-alike one,
        # --hard-negatives, as the metric ranks images) and a wrong caption (of a random other image) with its image
        wrong_img = [train[self.negative(x["k"], gen, self.hard)]["image"] for x in items]
        wrong_cap = []
        for x in items:
            other = train[self.negative(x["k"], gen, hard=1)]["ids"]
            wrong_cap.append(other[int(torch.randint(len(other), (1,), generator=gen))])
        return [{**x, "wrong_img": i, "wrong_cap": c} for x, i, c in zip(items, wrong_img, wrong_cap)]

    def score_matrix(self, model, head, split):
        """Every caption of the split against every image: (M captions, N images), and each caption's image."""
        ims = self.splits[split]
        caps = [(c, k) for k, im in enumerate(ims) for c in im["ids"]]
        M, N = len(caps), len(ims)
        txt = data.text_inputs([c for c, _ in caps], self.vocab, self.max_len)  # every caption once (M, T)
        # every image once (N, K, ...)
        img = data.image_inputs([self.images[im["image"]] for im in ims], self.tag_pieces, self.tags)
        scores = torch.empty(M * N)
        for start in range(0, M * N, self.eval_batch_size):
            pair = torch.arange(start, min(start + self.eval_batch_size, M * N))
            m, n = pair // N, pair % N  # caption, image of each pair
            inputs = {k: (txt[k][m] if k in txt else img[k][n]).to(self.device)
                      for k in INPUTS if k in txt or k in img}
            h, _ = model(**inputs)
            scores[pair] = head(model.pool(h)).squeeze(-1).float().cpu()
        return scores.view(M, N), torch.tensor([k for _, k in caps])

    def item_scores(self, model, head, split):
        return recall_at_k(*self.score_matrix(model, head, split), per_item=True)

    def baseline_scores(self, split):
        N, M = len(self.splits[split]), len(self.texts(self.splits[split]))
        return {f"R@{k}": [min(1.0, k / N)] * M for k in (1, 5, 10)}

    def texts(self, images):
        return [c for im in images for c in im["captions"]]  # one per caption, as score_matrix ranks them

    def train_texts(self):
        return self.texts(self.splits["train"])  # the training images' captions


class RefCOCO(Task):
    """RefCOCO+ (docs/METHOD.md §6): a linear score on each region's output; right when the top region's box has
    IoU >= 0.5 with the gold box. Trained with cross-entropy over the regions toward the region
    whose box best overlaps the gold box."""

    def make_head(self, model):
        return nn.Linear(model.cfg.hidden, 1)

    def region_logits(self, model, head, items):
        inputs = self.encode([x["ids"] for x in items], [x["image"] for x in items])
        h, spans = model(**inputs)
        logits = head(h[:, spans["regions"]]).squeeze(-1).float()  # (B, K)
        return logits.masked_fill(~inputs["region_mask"], float("-inf"))

    def loss(self, model, head, items):
        target = torch.tensor([int(x["iou"].argmax()) for x in items]).to(self.device, non_blocking=True)
        return F.cross_entropy(self.region_logits(model, head, items), target)

    # the data part

    def load_data(self, args, images, root):
        super().load_data(args, images, root)
        self.splits = load_refcoco(os.path.join(root, "refs(unc).p"), os.path.join(root, "instances.json"), images,
                                   self.skipped)
        if "train" not in self.splits:
            raise ValueError(f"{root}/refs(unc).p: no train split")
        cache = {}
        for items in self.splits.values():
            self.tokenize(items)
            for x in items:
                key = (x["image"], tuple(x["gold"]))
                if key not in cache:  # store boxes are x1/W, y1/H, x2/W, y2/H; COCO's are pixels
                    e = self.images[x["image"]]
                    W, H = x["size"]
                    cache[key] = (box_iou(e["boxes"] * np.array([W, H, W, H]), np.array(x["gold"])), e["scores"])
                x["iou"], x["conf"] = cache[key]  # (K,) each region's IoU with the gold box, the detector's confidence
        self.train = self.splits["train"]
        self.eval_splits = [s for s in ("val", "testA", "testB", "test", "testC") if s in self.splits]
        self.info.append("upper bound (some region has IoU >= 0.5): " + ", ".join(
            f"{s} {np.mean([x['iou'].max() >= 0.5 for x in self.splits[s]]):.3f}" for s in self.eval_splits))
        self.baseline_name = "the detector's most confident box"

    def item_scores(self, model, head, split):
        top = self.predict(self.region_logits, model, head, split)
        return {"accuracy": [x["iou"][k] >= 0.5 for k, x in zip(top, self.splits[split])]}

    def baseline_scores(self, split):
        return {"accuracy": [x["iou"][x["conf"].argmax()] >= 0.5 for x in self.splits[split]]}


TASKS = {"vqa": VQA, "nlvr2": NLVR2, "retrieval": Retrieval, "refcoco": RefCOCO}
