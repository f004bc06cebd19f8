"""finetune.py: each metric against its official definition, worked by hand; the loaders on small
files in each real format (and their errors); each head's shapes; every task end to end on a small
toy world."""

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis  # noqa: E402
import storage  # noqa: E402
import data  # noqa: E402
from toy import CLASSES, COLORS, FEATURE_DIM, make_toy_world  # noqa: E402
import common  # noqa: E402
import finetune as ft  # noqa: E402
import tasks  # noqa: E402
from model import Config, VisualBERT  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("raw, clean", [
    ("Two", "2"),  # number words become digits
    ("None", "0"),
    ("the dog.", "dog"),  # a period not before a digit goes; articles go
    ("An apple", "apple"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("yes!", "yes"),  # "!" touches no space: it becomes a space, which split() then drops
    ("red-and-white", "red and white"),
    ("hello, world", "hello world"),  # "," next to a space is deleted
    ("1,000", "1000"),  # a comma between digits: every mark is deleted
    ("cat/dog", "cat dog"),
    ("the u.s.", "us"),
    ("dont", "don't"),  # contractions get their apostrophes
    ("hes", "he's"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("im", "im"),  # the official table's "Im" has a capital and never matches
    ("isnt it", "isn't it"),
    ("it's", "it's"),  # the apostrophe and the colon are not among the official marks
    ("10:30", "10:30"),
    ("1,000 cats!", "1000 cats"),  # with a comma between digits even "!" is deleted, not made a space
    ("a man and a dog", "man and dog"),
    ("Ten", "10"),
    ("eleven", "eleven"),  # the official map stops at ten
    ("(left)", "left"),
    ("yes;no", "yes no"),
    ("  two \t dogs \n", "2 dogs"),
])
def test_answer_normalisation(raw, clean):
    assert tasks.normalize_answer(raw) == clean


def test_contraction_table_spellings():
    assert tasks.CONTRACTIONS["yall'd've"] == tasks.CONTRACTIONS["y'alld've"] == tasks.CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert tasks.CONTRACTIONS["twas"] == "'twas" and tasks.CONTRACTIONS["ow's'at"] == "'ow's'at"
    assert "wed" not in tasks.CONTRACTIONS  # "we'd" is not in the official table ("wed" is a word)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_hand(k, expected):
    # k of 10 annotators said "2". Leave one annotator out, 10 ways: for k = 1, the 9 subsets that
    # keep the matching annotator give min(1, 1/3), the other gives 0: 9/3/10 = 0.3. For k = 3:
    # 3 subsets keep 2 matches (2/3), 7 keep 3 (1): (2 + 7)/10 = 0.9. For k = 4: every subset has >= 3.
    gts = ["2"] * k + ["3"] * (10 - k)
    assert tasks.vqa_accuracy("2", gts) == pytest.approx(expected)
    assert tasks.soft_score(k) == pytest.approx(expected) == pytest.approx(min(1, 0.3 * k))


@pytest.mark.parametrize("pred, answers, expected", [
    # the official evaluation since its 2021 fix: annotators who disagree have their answers normalised
    # as the prediction is, so these four differ from the 2016 code (which gave 0.6, 0.9, 0.6 and 1.0)
    ("2", ["two"] * 4 + ["2"] * 2 + ["3"] * 4, 1.0),  # six "2" once "two" is a digit
    ("dog", ["a dog"] * 3 + ["dog"] * 3 + ["cat"] * 4, 1.0),  # six "dog" without the article
    ("yes", ["Yes"] * 5 + ["yes"] * 2 + ["no"] * 3, 1.0),  # seven "yes" in lower case
    ("two", ["2"] * 10, 0.0),  # all ten agree: nothing is normalised, "two" is not "2"
    ("Two", ["two"] * 10, 0.0),
    ("2", ["2"] * 10, 1.0),
    (" 2\n", ["2\t"] * 10, 1.0),  # but newlines and tabs become spaces, then both ends are stripped
    ("the dog.", ["dog"] * 3 + ["cat"] * 7, 0.9),  # disagreeing: the prediction is normalised too
    ("yes", ["yes."] * 3 + ["no"] * 7, 0.9),
    ("yes", ["yes."] * 10, 0.0),
])
def test_vqa_accuracy_is_the_official_one(pred, answers, expected):
    assert tasks.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_soft_score_with_fewer_annotators():
    assert tasks.soft_score(2, n=3) == pytest.approx((2 * (1 / 3) + 1 * (2 / 3)) / 3)  # the same definition
    assert tasks.vqa_accuracy("a", ["a", "a", "b"]) == pytest.approx(tasks.soft_score(2, n=3))


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3],  # caption 0, image 0 first: rank 0
                           [0.5, 0.4, 0.6, 0.1],  # caption 1, image 1 behind two: rank 2
                           [0.3, 0.3, 0.3, 0.3]])  # caption 2, image 3 tied with all: ties count against it, rank 3
    r = tasks.recall_at_k(scores, torch.tensor([0, 1, 3]), ks=(1, 2, 3, 4))
    assert r == pytest.approx({"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 2 / 3, "R@4": 1.0})


def test_box_iou_by_hand():
    assert tasks.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # overlap 1, union 4 + 4 - 1
    assert tasks.box_iou([0, 0, 4, 4], [0, 0, 2, 2]) == pytest.approx(0.25)
    assert tasks.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert tasks.box_iou([5, 5, 9, 9], [5, 5, 9, 9]) == pytest.approx(1.0)
    many = tasks.box_iou(np.array([[0, 0, 2, 2], [1, 1, 3, 3], [10, 10, 11, 11]]), np.array([1, 1, 3, 3]))
    assert many.shape == (3,) and many == pytest.approx([1 / 7, 1, 0])


def test_nlvr2_consistency_by_hand():
    # sentence a: both pairs right; b: one wrong; c: its one pair right
    assert tasks.consistency(["a", "a", "b", "b", "c"], [1, 1, 1, 0, 1]) == pytest.approx(2 / 3)
    assert tasks.consistency(["a", "a"], [0, 0]) == 0.0


# -----------------------------------------------------------------------------
# loaders, on small files in each real format


@pytest.fixture
def store(tmp_path):
    """A feature store of five images named as real stores name them."""
    ids = ["COCO_val2014_000000000042", "7", "dev-1-0-img0", "dev-1-0-img1", "1000092795"]
    w = storage.FeatureWriter(str(tmp_path / "store"), 4, ["cat", "dog"])
    for i in ids:
        w.add(i, np.ones((2, 4), np.float32), np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32),
              np.array([0, 1]), np.array([0.9, 0.4], np.float32), 100, 50)
    w.close()
    return data.Images([str(tmp_path / "store")])


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def vqa_files(tmp_path, questions, annotations):
    q = write(tmp_path / "questions.json", {"questions": questions})
    a = write(tmp_path / "annotations.json", {"annotations": annotations})
    return q, a


def annotation(qid, image_id, answers):
    return {"question_id": qid, "image_id": image_id, "question_type": "how many", "answer_type": "number",
            "multiple_choice_answer": answers[0], "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]}


def test_vqa_loader(tmp_path, store):
    q, a = vqa_files(tmp_path, [{"image_id": 42, "question": "how many cats?", "question_id": 1},
                                {"image_id": 7, "question": "how many dogs?", "question_id": 2}],
                     [annotation(1, 42, ["2"] * 10), annotation(2, 7, ["1"] * 10)])
    skipped = tasks.Skipped()
    items = tasks.load_vqa(q, a, store, skipped)
    assert [x["image"] for x in items] == ["COCO_val2014_000000000042", "7"]  # the file stem, then the number
    assert items[0]["answers"] == ["2"] * 10 and items[0]["qtype"] == "how many" and items[0]["mc"] == "2"
    assert skipped.files == {}


def test_vqa_loader_skips_a_question_without_features(tmp_path, store):
    q, a = vqa_files(tmp_path, [{"image_id": 42, "question": "?", "question_id": 1}, {"image_id": 99, "question": "?", "question_id": 2},
                                {"image_id": 98, "question": "?", "question_id": 3}],
                     [annotation(1, 42, ["2"] * 10), annotation(2, 99, ["1"] * 10), annotation(3, 98, ["1"] * 10)])
    skipped = tasks.Skipped()
    assert [x["qid"] for x in tasks.load_vqa(q, a, store, skipped)] == [1]  # the question with features stays
    [line] = skipped.lines()
    assert line.startswith(f"skipped 2 records of {q}: first: record 1 (question_id 2): its image has no features in {tmp_path / 'store'}")
    assert "'99', 'COCO_train2014_000000000099'" in line  # what was looked for
    # a split with no usable question left is fatal: the task files and the stores do not fit
    q, a = vqa_files(tmp_path, [{"image_id": 99, "question": "?", "question_id": 2}], [annotation(2, 99, ["1"] * 10)])
    with pytest.raises(ValueError, match=r"questions.json: no usable question; all 1 skipped, first: record 0 \(question_id 2\): its image has no"):
        tasks.load_vqa(q, a, store, tasks.Skipped())


def test_vqa_loader_rejects_missing_fields(tmp_path, store):
    bad = annotation(1, 42, ["2"] * 10)
    del bad["answers"]
    q, a = vqa_files(tmp_path, [{"image_id": 42, "question": "?", "question_id": 1}], [bad])
    with pytest.raises(ValueError, match=r"annotations.json: record 0 \(question_id 1\) has no field 'answers'"):
        tasks.load_vqa(q, a, store, tasks.Skipped())
    q, a = vqa_files(tmp_path, [{"image_id": 99, "question_id": 1}], [annotation(1, 99, ["2"] * 10)])  # malformed beats unseen image
    with pytest.raises(ValueError, match=r"questions.json: record 0 \(question_id 1\) has no field 'question'"):
        tasks.load_vqa(q, a, store, tasks.Skipped())
    q, a = vqa_files(tmp_path, [{"image_id": 42, "question": "?", "question_id": 5}], [annotation(1, 42, ["2"] * 10)])
    with pytest.raises(ValueError, match=r"questions.json: record 0 \(question_id 5\): .*annotations.json has no annotation"):
        tasks.load_vqa(q, a, store, tasks.Skipped())


def write_lines(path, records):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def read_task(args, vocab, images, root):
    """The task of args.task with its files under root read, as finetune.py builds it."""
    task = tasks.TASKS[args.task](args, vocab, images.class_names)
    task.load_data(args, images, root)
    return task


def vqa_folder(tmp_path):
    """VQA files under their official names: three training and three validation questions."""
    ten = lambda *parts: [a for n, a in parts for _ in range(n)]  # noqa: E731
    splits = {"train2014": [(1, 42, "yes", ten((10, "yes"))), (2, 7, "yes", ten((7, "yes"), (3, "no"))),
                            (3, 42, "Two", ten((4, "two"), (2, "2"), (4, "3")))],
              "val2014": [(11, 42, "2", ten((10, "2"))), (12, 7, "2", ten((6, "2"), (4, "3"))), (13, 7, "Two", ten((10, "Two")))]}
    for sub, qs in splits.items():
        write(tmp_path / f"v2_OpenEnded_mscoco_{sub}_questions.json",
              {"questions": [{"image_id": i, "question": "how many cats?", "question_id": q} for q, i, _, _ in qs]})
        write(tmp_path / f"v2_mscoco_{sub}_annotations.json",
              {"annotations": [{**annotation(q, i, answers), "multiple_choice_answer": mc} for q, i, mc, answers in qs]})
    return {sub: str(tmp_path / f"v2_mscoco_{sub}_annotations.json") for sub in splits}


def test_answer_set_counted_over_the_files_named(tmp_path):
    files = vqa_folder(tmp_path)
    # multiple_choice_answer, normalised: train "yes" 2, "2" 1 ("Two"); val "2" 3 ("2", "2", "Two")
    assert tasks.read_answer_set([files["train2014"]], 2)[0] == ["yes"]
    answers, source = tasks.read_answer_set([files["train2014"], files["val2014"]], 2)
    assert answers == ["2", "yes"] and source.startswith("each the answer of >= 2 questions of ")
    assert tasks.read_answer_set([files["train2014"], files["val2014"]], 3)[0] == ["2"]
    with pytest.raises(ValueError, match="no answer is given to 5 questions of .*: lower --min-answer-count"):
        tasks.read_answer_set([files["train2014"], files["val2014"]], 5)
    ans2label = write(tmp_path / "trainval_ans2label.json", {"no": 1, "3": 3, "yes": 0, "2": 2})
    assert tasks.read_answer_set([ans2label], 9) == (["yes", "no", "2", "3"], f"read from {ans2label}")  # in index order
    for bad in ({"yes": 0, "no": 0}, {"yes": 1}, {"yes": "0"}, {"yes": True}, {}):
        with pytest.raises(ValueError, match="nor an ans2label file"):
            tasks.read_answer_set([write(tmp_path / "bad.json", bad)], 9)


def test_answer_flag_and_training_targets_follow_the_official_evaluation(tmp_path, store):
    files = vqa_folder(tmp_path)
    vocab = data.Vocab(list(data.Vocab.RESERVED) + ["how", "many", "cat", "##s", "?", "dog"])
    ans2label = write(tmp_path / "trainval_ans2label.json", {"yes": 0, "no": 1, "2": 2, "3": 3})
    counted = read_task(ft.parser.parse_args(["--task", "vqa", "--answers", *files.values(), "--min-answer-count", "2"]), vocab, store, str(tmp_path))
    assert counted.answers == ["2", "yes"] and counted.info[-1].startswith("2 answers (each the answer of >= 2 questions of")
    task = read_task(ft.parser.parse_args(["--task", "vqa", "--answers", ans2label]), vocab, store, str(tmp_path))
    assert task.answers == ["yes", "no", "2", "3"] and task.info[-1] == f"4 answers (read from {ans2label})"
    # each target is the official accuracy of that answer: question 3's "two" counts as "2" (its
    # annotators disagree), question 13's ten "Two" match no answer of the set (they agree: kept as said)
    for x in task.splits["train"] + task.splits["val"]:
        assert {a: x["target"].get(a, 0.0) for a in range(4)} == pytest.approx(
            {a: tasks.vqa_accuracy(label, x["answers"]) for a, label in enumerate(task.answers)}), x["qid"]
    by_qid = {x["qid"]: x["target"] for x in task.splits["train"] + task.splits["val"]}
    assert by_qid[3] == pytest.approx({2: 1.0, 3: 1.0}) and by_qid[2] == pytest.approx({0: 1.0, 1: 0.9}) and by_qid[13] == {}


def test_nlvr2_loader(tmp_path, store):
    f = write_lines(tmp_path / "dev.json", [{"identifier": "dev-1-0-3", "sentence": "two cats .", "label": "True"},
                                            {"identifier": "dev-1-0-4", "sentence": "no dog .", "label": "False"}])
    items = tasks.load_nlvr2(f, store, tasks.Skipped())
    assert items[0]["images"] == ("dev-1-0-img0", "dev-1-0-img1") and [x["label"] for x in items] == [1, 0]
    assert items[0]["sentence"] == "dev-1-3"  # the identifier without its pair index


@pytest.mark.parametrize("record, message", [
    ({"identifier": "dev-1-0-3", "label": "True"}, r"dev.json: line 2 \(dev-1-0-3\) has no field 'sentence'"),
    ({"identifier": "dev-1-0-3", "sentence": "x", "label": "maybe"}, r"dev.json: line 2 \(dev-1-0-3\): label 'maybe'"),
    ({"identifier": "dev-1-3", "sentence": "x", "label": "True"}, r"dev.json: line 2 \(dev-1-3\): the identifier is not split-set-pair-sentence"),
])
def test_nlvr2_loader_rejects_bad_records(tmp_path, store, record, message):
    f = write_lines(tmp_path / "dev.json", [{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}, record])
    with pytest.raises(ValueError, match=message):
        tasks.load_nlvr2(f, store, tasks.Skipped())


def test_nlvr2_loader_skips_a_pair_without_features(tmp_path, store):
    f = write_lines(tmp_path / "dev.json", [{"identifier": "dev-2-0-3", "sentence": "x", "label": "True"},  # neither image is stored
                                            {"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}])
    skipped = tasks.Skipped()
    assert [x["id"] for x in tasks.load_nlvr2(f, store, skipped)] == ["dev-1-0-0"]
    assert skipped.lines() == [f"skipped 1 records of {f}: first: line 1 (dev-2-0-3): its image has no features in "
                               f"{tmp_path / 'store'} (looked for 'dev-2-0-img0')"]  # one record, counted once
    f = write_lines(tmp_path / "dev.json", [{"identifier": "dev-2-0-3", "sentence": "x", "label": "True"}])
    with pytest.raises(ValueError, match=r"dev.json: no usable example; all 1 skipped, first: line 1 \(dev-2-0-3\)"):
        tasks.load_nlvr2(f, store, tasks.Skipped())


def karpathy(split="test", filename="1000092795.jpg", sentences=True):
    im = {"filename": filename, "split": split}
    if sentences:
        im["sentences"] = [{"raw": "a cat .", "tokens": ["a", "cat"]}, {"tokens": ["a", "dog"]}]
    return {"images": [im]}


def test_karpathy_loader(tmp_path, store):
    splits = tasks.load_karpathy(write(tmp_path / "dataset_flickr30k.json", karpathy()), store, tasks.Skipped())
    assert splits == {"test": [{"image": "1000092795", "captions": ["a cat .", "a dog"]}]}
    splits = tasks.load_karpathy(write(tmp_path / "d.json", karpathy(split="restval")), store, tasks.Skipped())
    assert list(splits) == ["train"]  # restval is training data


def test_karpathy_loader_skips_an_image_without_features(tmp_path, store):
    f = write(tmp_path / "dataset_flickr30k.json", {"images": karpathy(filename="5.jpg")["images"] + karpathy()["images"]})
    skipped = tasks.Skipped()
    assert [im["image"] for im in tasks.load_karpathy(f, store, skipped)["test"]] == ["1000092795"]
    assert skipped.files == {f: [1, f"image record 0 (5.jpg): its image has no features in {tmp_path / 'store'} (looked for '5')"]}


@pytest.mark.parametrize("kw, message", [
    (dict(split="training"), r"dataset_flickr30k.json: image record 0 \(1000092795.jpg\): unknown split 'training'"),
    (dict(sentences=False), r"dataset_flickr30k.json: image record 0 \(1000092795.jpg\) has no field 'sentences'"),
    (dict(filename="5.jpg"), r"dataset_flickr30k.json: no usable image of split 'test'; all 1 skipped, first: image record 0 \(5.jpg\): "
                             r"its image has no features"),  # a split left empty
])
def test_karpathy_loader_rejects_bad_records(tmp_path, store, kw, message):
    with pytest.raises(ValueError, match=message):
        tasks.load_karpathy(write(tmp_path / "dataset_flickr30k.json", karpathy(**kw)), store, tasks.Skipped())


def refcoco_files(tmp_path, *more, **changes):
    """refs(unc).p with one ref (changed as asked), then `more`; image 43 is in COCO, not in the store."""
    ref = {"ref_id": 0, "ann_id": 5, "image_id": 42, "split": "val", "sentences": [{"sent": "the cat"}, {"sent": "left cat"}], **changes}
    ref = {k: v for k, v in ref.items() if v is not None}
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump([ref, *more], f)
    write(tmp_path / "instances.json", {"images": [{"id": 42, "width": 100, "height": 50}, {"id": 43, "width": 100, "height": 50}],
                                        "annotations": [{"id": 5, "image_id": 42, "bbox": [0, 0, 50, 25]}]})
    return str(tmp_path / "refs(unc).p"), str(tmp_path / "instances.json")


def test_refcoco_loader(tmp_path, store):
    splits = tasks.load_refcoco(*refcoco_files(tmp_path), store, tasks.Skipped())
    assert [x["text"] for x in splits["val"]] == ["the cat", "left cat"]  # one example per sentence
    x = splits["val"][0]
    assert x["image"] == "COCO_val2014_000000000042" and x["gold"] == [0, 0, 50, 25] and x["size"] == (100, 50)


@pytest.mark.parametrize("changes, message", [
    (dict(split="testD"), r"refs\(unc\).p: record 0 \(ref_id 0\): unknown split 'testD'"),
    (dict(sentences=None), r"refs\(unc\).p: record 0 \(ref_id 0\) has no field 'sentences'"),
    (dict(ann_id=6), r"refs\(unc\).p: record 0 \(ref_id 0\): annotation 6 is not in .*instances.json"),
    (dict(image_id=43), r"refs\(unc\).p: no usable expression of split 'val'; all 1 skipped, first: record 0 \(ref_id 0\): its image has no"),
])
def test_refcoco_loader_rejects_bad_records(tmp_path, store, changes, message):
    with pytest.raises(ValueError, match=message):
        tasks.load_refcoco(*refcoco_files(tmp_path, **changes), store, tasks.Skipped())


def test_refcoco_loader_skips_a_ref_without_features(tmp_path, store):
    unseen = {"ref_id": 1, "ann_id": 5, "image_id": 43, "split": "val", "sentences": [{"sent": "a dog"}]}
    refs, instances = refcoco_files(tmp_path, unseen)
    skipped = tasks.Skipped()
    assert [x["ref_id"] for x in tasks.load_refcoco(refs, instances, store, skipped)["val"]] == [0, 0]  # ref 0's two sentences
    assert skipped.files[refs][0] == 1 and skipped.files[refs][1].startswith("record 1 (ref_id 1): its image has no features")


# -----------------------------------------------------------------------------
# the tasks on a small toy world: heads, accuracy of the protocol, end to end


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def make_task(toy, name, *flags):
    args = ft.parser.parse_args(["--task", name, "--min-answer-count", "1", *flags])
    folder, stores = ft.TOY[name]
    images = data.Images([os.path.join(toy, "features", s) for s in stores])
    model, vocab = common.make_model(args, images, os.path.join(toy, "vocab.txt"))
    task = read_task(args, vocab, images, os.path.join(toy, "tasks", folder))
    return task, model.eval(), task.make_head(model)


@torch.no_grad()
def test_head_shapes(toy):
    task, model, head = make_task(toy, "vqa")
    assert task.logits(model, head, task.train[:3]).shape == (3, len(task.answers))
    task, model, head = make_task(toy, "nlvr2")
    assert task.logits(model, head, task.train[:3]).shape == (3, 2)
    task, model, head = make_task(toy, "retrieval")
    assert task.scores(model, head, [x["ids"] for x in task.train[:3]], [x["image"] for x in task.train[:3]]).shape == (3,)
    scores, gold = task.score_matrix(model, head, "test")
    assert scores.shape == (5 * len(task.splits["test"]), len(task.splits["test"])) and gold.tolist()[:6] == [0] * 5 + [1]
    one = task.scores(model, head, [task.splits["test"][1]["ids"][2]], [task.splits["test"][3]["image"]])
    assert scores[5 + 2, 3].item() == pytest.approx(one.item(), abs=1e-5)  # the batched matrix is the pairwise score
    task, model, head = make_task(toy, "refcoco")
    items = task.train[:3]
    logits = task.region_logits(model, head, items)
    K = max(len(x["iou"]) for x in items)
    assert logits.shape == (3, K)
    assert all(torch.isinf(logits[i, len(x["iou"]):]).all() and torch.isfinite(logits[i, :len(x["iou"])]).all() for i, x in enumerate(items))


def test_retrieval_hard_negatives(toy):
    task, _, _ = make_task(toy, "retrieval")
    gen = torch.Generator().manual_seed(0)
    t = task.tag_sets
    jaccard = lambda a, b: (t[a] & t[b]).sum() / (t[a] | t[b]).sum()
    for k in range(len(task.splits["train"])):
        assert task.negative(k, gen, hard=1) != k  # never the positive image
        n = len(task.splits["train"])  # with every other image a candidate, the most tag-alike one wins
        best = max(jaccard(k, j) for j in range(n) if j != k)
        assert jaccard(k, task.negative(k, gen, hard=50 * n)) == best


def test_no_tags_leaves_tags_out(toy):
    task, _, _ = make_task(toy, "vqa", "--no-tags")
    x = task.train[0]
    assert "tag_ids" not in task.encode([x["ids"]], [x["image"]])
    task, _, _ = make_task(toy, "vqa")
    assert "tag_ids" in task.encode([x["ids"]], [x["image"]])


def test_refcoco_boxes_compared_in_pixels(toy):
    task, _, _ = make_task(toy, "refcoco")
    x = task.splits["val"][0]
    e = task.images[x["image"]]
    W, H = x["size"]
    assert x["iou"] == pytest.approx(tasks.box_iou(e["boxes"] * [W, H, W, H], x["gold"]))
    assert x["iou"].max() > 0.5  # the toy detector finds the referred object


def test_vqa_answer_set_and_targets(toy):
    task, _, _ = make_task(toy, "vqa")
    x = task.train[0]
    for a, s in x["target"].items():  # each target is the official accuracy of that answer
        assert s == pytest.approx(tasks.vqa_accuracy(task.answers[a], x["answers"]))
    args = ft.parser.parse_args(["--task", "vqa", "--min-answer-count", "100000"])
    with pytest.raises(ValueError, match="lower --min-answer-count"):
        read_task(args, task.vocab, task.images, os.path.join(toy, "tasks", "vqa"))


def test_class_names_in_text():
    """A name or its plural as whole words, the longest name first, a name before another class's plural."""
    namer = analysis.ClassNamer(["dog", "hot dog", "knife", "bus", "glass", "glasses", "man", "cherry", "t-shirt"])
    assert namer("Two hot dogs, three knives; BUSES.") == {1, 2, 3}
    assert namer("the glasses and a glass") == {5, 4}  # "glasses" is its own class, not glass's plural
    assert namer("men in t-shirts eat cherries") == {6, 8, 7}
    assert namer("a dogma of buss") == {3}  # whole words only: "dogma" is no dog; "buss" is bus + s
    assert namer("nothing here") == set()


def test_rare_and_common_items_by_hand():
    """docs/METHOD.md section 13: an item is rare when its rarest named class is named by fewer than
    analysis.RARE training examples. dog is named by 5 training examples (common), hot dog by 1 (rare)."""
    train = [{0}] * 5 + [{1}]
    items = [{0}, {1}, {0, 1}, set()]  # common, rare, rare (its rarest class), neither
    got = analysis.by_class(items, train, {"accuracy": [1.0, 0.0, 1.0, 1.0]})
    assert got == {"rare": {"accuracy": 0.5, "items": 2}, "common": {"accuracy": 1.0, "items": 1}}
    assert analysis.by_class([set()], train, {"accuracy": [1.0]})["rare"] == {"accuracy": None, "items": 0}


def run(toy, out, task, *flags):
    return ft.main(["--task", task, "--toy-root", toy, "--out", str(out), "--epochs", "0.5", "--batch-size", "8",
                    "--log-every", "1", "--min-answer-count", "1", *flags])


EXPECTED = {"vqa": ({"val"}, {"accuracy"}), "nlvr2": ({"dev", "test1"}, {"accuracy", "consistency"}),
            "retrieval": ({"test"}, {"R@1", "R@5", "R@10"}), "refcoco": ({"val", "testA", "testB"}, {"accuracy"})}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_end_to_end(toy, tmp_path, task):
    results = run(toy, tmp_path, task)
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == results
    splits, metrics = EXPECTED[task]
    assert results["task"] == task and set(results) == {"task", "by_class"} | splits
    for s in splits:
        assert set(results[s]) == metrics and all(0 <= v <= 1 for v in results[s].values())
    with open(tmp_path / "baseline.json") as f:
        baseline = json.load(f)
    assert all(set(baseline[s]) == metrics for s in splits)
    # rare and common items: every toy item names a class, but for VQA's "which N is in the scene?" (N a
    # group); where all do, the two groups' means, weighted by their items, give the split's own figure back
    # (consistency is no mean over items)
    if task == "vqa":
        questions = os.path.join(toy, "tasks", "vqa", "v2_OpenEnded_mscoco_val2014_questions.json")
        naming = len([q for q in json.load(open(questions))["questions"] if not q["question"].startswith("which ")])
    for obj in (results, baseline):
        assert obj["by_class"]["rare_below"] == analysis.RARE and set(obj["by_class"]) == {"rare_below"} | splits
        for s in splits:
            rare, common_ = obj["by_class"][s]["rare"], obj["by_class"][s]["common"]
            n = rare["items"] + common_["items"]
            per_item = metrics - {"consistency"}
            assert n > 0 and all((g[k] is None) == (g["items"] == 0) for g in (rare, common_) for k in per_item)
            if task == "vqa":
                assert n == naming
                continue
            for k in per_item:
                mixed = sum(g[k] * g["items"] for g in (rare, common_) if g["items"]) / n
                assert mixed == pytest.approx(obj[s][k], abs=1e-9)
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert log[0]["step"] == 1 and log[-1]["phase"] == "eval"
    assert os.path.exists(tmp_path / "args.json")


def test_nlvr2_task_pretraining_keeps_the_best_epoch(toy, tmp_path, capsys):
    run(toy, tmp_path, "nlvr2", "--task-pretrain-epochs", "2", "--epochs", "0.2")
    out = capsys.readouterr().out
    assert "task-specific pre-training epoch 2" in out and "kept epoch" in out
    with open(tmp_path / "log.jsonl") as f:
        first = json.loads(f.readline())
    assert first["phase"] == "task_pretrain" and first["task_pretrain_epoch"] in (1, 2)
    with pytest.raises(SystemExit):
        run(toy, tmp_path, "vqa", "--task-pretrain-epochs", "1")  # NLVR2's alone


def save_ckpt(path, toy, **changes):
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    cfg = Config(**{**dict(vocab_size=len(vocab), hidden=32, layers=1, heads=2, ffn=64, max_positions=64, feat_dim=FEATURE_DIM,
                           num_labels=len(CLASSES), num_attrs=len(COLORS)), **changes})
    torch.save({"model": VisualBERT(cfg).state_dict(), "config": cfg.to_dict(), "vocab": vocab.tokens, "class_names": CLASSES}, path)
    return str(path)


def test_init_from_checkpoint_and_its_checks(toy, tmp_path):
    results = run(toy, tmp_path / "out", "refcoco", "--init-from", save_ckpt(tmp_path / "ckpt.pt", toy))
    assert set(results) == {"task", "by_class", "val", "testA", "testB"}
    with pytest.raises(SystemExit, match=rf"pre-trained with feature size 12, the feature stores .* have {FEATURE_DIM}"):
        run(toy, tmp_path / "out2", "refcoco", "--init-from", save_ckpt(tmp_path / "bad.pt", toy, feat_dim=12))
    with pytest.raises(SystemExit, match=rf"pre-trained with detector classes 5, .* have {len(CLASSES)}"):
        run(toy, tmp_path / "out3", "refcoco", "--init-from", save_ckpt(tmp_path / "bad.pt", toy, num_labels=5))


def test_init_from_huggingface_bert(toy, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens = data.Vocab.from_file(os.path.join(toy, "vocab.txt")).tokens
    cfg = transformers.BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path / "bert")
    with open(tmp_path / "bert" / "vocab.txt", "w") as f:
        f.write("\n".join(tokens) + "\n")
    results = run(toy, tmp_path / "out", "nlvr2", "--init-from", str(tmp_path / "bert"))
    assert set(results) == {"task", "by_class", "dev", "test1"}


def test_real_data_flags(toy, tmp_path):
    # --data and --features are the toy world's files read as real ones; one without the other is an error
    results = run(toy, tmp_path / "out", "retrieval", "--data", os.path.join(toy, "tasks", "flickr30k"),
                  "--features", os.path.join(toy, "features", "flickr30k"), "--init-from", save_ckpt(tmp_path / "ckpt.pt", toy))
    assert set(results) == {"task", "by_class", "test"}
    with pytest.raises(SystemExit):
        run(toy, tmp_path / "out2", "retrieval", "--data", os.path.join(toy, "tasks", "flickr30k"))
    with pytest.raises(SystemExit, match="needs a vocabulary"):  # real data and random weights: no vocabulary to use
        run(toy, tmp_path / "out2", "retrieval", "--data", os.path.join(toy, "tasks", "flickr30k"), "--features", os.path.join(toy, "features", "flickr30k"))
    with pytest.raises(SystemExit, match="no features"):  # a store without the task's images
        run(toy, tmp_path / "out2", "retrieval", "--data", os.path.join(toy, "tasks", "flickr30k"),
            "--features", os.path.join(toy, "features", "refcoco"), "--init-from", save_ckpt(tmp_path / "ckpt.pt", toy))


# -----------------------------------------------------------------------------
# bad input in a whole run: what is skipped is said at the start and the end; what is fatal stops
# the run before it trains


def test_a_record_without_features_is_skipped_and_reported(toy, tmp_path, capsys):
    with open(os.path.join(toy, "tasks", "flickr30k", "dataset_flickr30k.json")) as f:
        split_file = json.load(f)
    split_file["images"] += [{"filename": f"nowhere{k}.jpg", "split": s, "sentences": [{"raw": "a cat ."}]} for k, s in enumerate(["train", "test"])]
    file = write(tmp_path / "dataset_flickr30k.json", split_file)
    results = run(toy, tmp_path / "out", "retrieval", "--data", str(tmp_path), "--features", os.path.join(toy, "features", "flickr30k"),
                  "--init-from", save_ckpt(tmp_path / "ckpt.pt", toy))
    assert results["skipped"] == {file: 2}
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f)["skipped"] == {file: 2}
    out = capsys.readouterr().out
    line = f"warning: skipped 2 records of {file}: first: image record {len(split_file['images']) - 2} (nowhere0.jpg): its image has no features"
    assert out.count(line) == 2  # at the start and at the end
    assert out.index(line) < out.index("steps per epoch") and out.rindex(line) > out.rindex("ms/step")  # before training, after it


def test_vqa_answers_outside_the_answer_set_stay_and_are_reported(toy, tmp_path, capsys):
    task, _, _ = make_task(toy, "vqa", "--min-answer-count", "10")
    annotations = storage.read_json(os.path.join(toy, "tasks", "vqa", "v2_mscoco_val2014_annotations.json"))["annotations"]
    outside = {a["question_id"] for a in annotations if not {tasks.normalize_answer(x["answer"]) for x in a["answers"]} & set(task.answers)}
    val = task.splits["val"]
    assert outside and len(val) == len(annotations)  # every question stays, the official evaluation counts it...
    assert {x["qid"] for x in val if not x["target"]} == outside  # ...with an empty training target
    run(toy, tmp_path, "vqa", "--min-answer-count", "10", "--epochs", "0.1")
    out = capsys.readouterr().out
    assert out.count("outside the answer set (kept, with an empty training target): train ") == 2  # at the start and the end
    assert f", val {len(outside)}/{len(val)}" in out


def test_resume_and_init_from_refuse_a_checkpoint_that_does_not_fit(toy, tmp_path):
    run(toy, tmp_path, "vqa", "--epochs", "0.1")  # a finished run of the tiny model: OUT/ckpt.pt
    with open(tmp_path / "log.jsonl") as f:
        before = f.read()
    with pytest.raises(SystemExit, match=r"ckpt.pt: saved by a run with other settings: --model 'tiny' \(now 'small'\); resume with the same"):
        run(toy, tmp_path, "vqa", "--epochs", "0.1", "--model", "small", "--resume")
    with open(tmp_path / "log.jsonl") as f:
        assert f.read() == before  # refused before any work
    os.makedirs(tmp_path / "pre")
    save_ckpt(tmp_path / "pre" / "ckpt.pt", toy)  # pretrain.py's: no head
    with pytest.raises(SystemExit, match=r"pre/ckpt.pt: not a checkpoint of finetune.py \(no head inside\)"):
        run(toy, tmp_path / "pre", "vqa", "--resume")
    with pytest.raises(SystemExit, match=r"empty/ckpt.pt: checkpoint not found"):
        run(toy, tmp_path / "empty", "vqa", "--resume")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other.pt: not a checkpoint of pretrain.py or finetune.py"):
        run(toy, tmp_path / "o2", "vqa", "--init-from", str(tmp_path / "other.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=r"notes.txt: not a readable checkpoint"):
        run(toy, tmp_path / "o2", "vqa", "--init-from", str(tmp_path / "notes.txt"))
    wrong = torch.load(save_ckpt(tmp_path / "wrong.pt", toy), weights_only=False)
    wrong["config"]["hidden"] = 64  # weights of a hidden size of 32 under a config of 64
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit, match=r"wrong.pt: its weights do not fit the model \(Error\(s\) in loading state_dict"):
        run(toy, tmp_path / "o2", "vqa", "--init-from", str(tmp_path / "wrong.pt"))


def test_train_fraction_subsets_are_nested_and_fixed():
    """--train-fraction: a beginning of one fixed order, so 1/16 lies inside 1/4, whatever --seed is."""
    sixteenth, quarter, whole = tasks.train_subset(1000, 1 / 16), tasks.train_subset(1000, 0.25), tasks.train_subset(1000, 1.0)
    assert (len(sixteenth), len(quarter)) == (63, 250) and whole.tolist() == list(range(1000))  # ceil(F * N), sorted
    assert set(sixteenth) < set(quarter) < set(whole)
    np.testing.assert_array_equal(tasks.train_subset(1000, 1 / 16), sixteenth)  # the same in another run
    assert sixteenth.tolist() != list(range(63))  # spread over the set, not its first items
    assert len(tasks.train_subset(3, 0.01)) == 1


@pytest.mark.parametrize("name", ["vqa", "retrieval"])
def test_train_fraction_keeps_a_subset_of_the_task(toy, name):
    full, _, _ = make_task(toy, name)
    part, _, _ = make_task(toy, name)
    part.keep_train(0.5)
    if name == "vqa":
        assert len(part.train) == -(-len(full.train) // 2)
        assert {x["qid"] for x in part.train} < {x["qid"] for x in full.train}
        assert part.answers == full.answers  # the answer set stays the whole training set's
    else:  # retrieval: half the images, each with all its captions; negatives come from them alone
        kept = part.splits["train"]
        assert len(kept) == -(-len(full.splits["train"]) // 2)
        assert {x["image"] for x in part.train} == {im["image"] for im in kept} and len(part.train) == sum(len(im["ids"]) for im in kept)
        assert part.tag_sets.shape[0] == len(kept) and all(x["k"] < len(kept) for x in part.train)
        drawn = part.draw(part.train[:8], torch.Generator().manual_seed(0))
        assert {x["wrong_img"] for x in drawn} <= {im["image"] for im in kept}
    assert any("--train-fraction 0.5" in line for line in part.info)


def test_train_fraction_end_to_end_and_bad_value(toy, tmp_path, capsys):
    run(toy, tmp_path, "refcoco", "--train-fraction", "0.25")
    assert "training on" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(toy, tmp_path / "o2", "refcoco", "--train-fraction", "1.5")
    assert "--train-fraction 1.5" in capsys.readouterr().err
