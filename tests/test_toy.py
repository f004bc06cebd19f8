"""The toy world (v2: docs/METHOD.md section 12; v3's tasks: section 14): the detector's tags are its own read-out of the stored
features, the world is the same in every process, its statistics, and toy.py's command-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import tasks  # noqa: E402
import toy  # noqa: E402
from storage import FeatureStore  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.make_toy_world(str(tmp_path_factory.mktemp("toy") / "w"), seed=3, scale=0.02, log=lambda *a: None)


def test_a_stored_tag_is_the_detectors_read_out_of_the_stored_feature(world):
    """Recomputed here from the stored (fp16) features and detector.npz: every tag, confidence, attribute
    and attribute confidence of every store; and detector.npz is the world's detector, fitted from its seed."""
    det = np.load(os.path.join(world, "detector.npz"))
    fitted = toy.ToyWorld(3).detector
    for k in ("class_W", "class_b", "attr_W", "attr_b"):
        np.testing.assert_array_equal(det[k], fitted[k])
    for name in os.listdir(os.path.join(world, "features")):
        store = FeatureStore(os.path.join(world, "features", name))
        for i in store.ids()[:20]:
            e = store[i]
            labels, scores = toy.read_out(e["features"], det["class_W"], det["class_b"])
            attrs, attr_scores = toy.read_out(e["features"], det["attr_W"], det["attr_b"])
            np.testing.assert_array_equal(e["labels"], labels, err_msg=f"{name} {i}")
            np.testing.assert_array_equal(e["attributes"], attrs, err_msg=f"{name} {i}")
            np.testing.assert_allclose(e["scores"], scores, atol=1e-3)
            np.testing.assert_allclose(e["attr_scores"], attr_scores, atol=1e-3)


def test_tags_are_wrong_where_the_feature_is_ambiguous(world):
    """No coin flip: a wrong tag is the read-out's own mistake, most often the near-duplicate or a class
    of the same group; the confidence is lower where the tag is wrong."""
    scenes, store = toy.read_json(os.path.join(world, "scenes.json")), FeatureStore(os.path.join(world, "features", "pretrain"))
    truth = np.array([toy.CLASSES.index(o["class"]) for i in store.ids() for o in scenes[i]["objects"]])
    tags = np.concatenate([store[i]["labels"] for i in store.ids()])
    scores = np.concatenate([store[i]["scores"] for i in store.ids()])
    right = tags == truth
    assert 0.3 < right.mean() < 0.95
    same_group = [toy.GROUP_OF[toy.CLASSES[t]] == toy.GROUP_OF[toy.CLASSES[c]] for t, c in zip(tags[~right], truth[~right])]
    assert np.mean(same_group) > 0.3  # chance: 1 in 22
    assert scores[right].mean() > scores[~right].mean()


def test_classes_groups_pairs_and_frequency():
    assert len(toy.CLASSES) == len(set(toy.CLASSES)) == 330 and all(len(g) == 15 for g in toy.GROUPS.values())
    assert len(toy.PAIRS) == 55 and all(toy.GROUP_OF[a] == toy.GROUP_OF[b] for a, b in toy.PAIRS)
    world = toy.ToyWorld(0)
    assert np.isclose(world.freq.sum(), 1) and world.freq.max() / world.freq.min() > 100  # a long tail
    a, b = (toy.CLASSES.index(c) for c in toy.PAIRS[0])
    cos = world.class_vec[a] @ world.class_vec[b] / np.linalg.norm(world.class_vec[a]) / np.linalg.norm(world.class_vec[b])
    assert cos > 0.98
    assert [toy.plural(c) for c in ["bus", "cherry", "knife", "toy", "fire truck"]] == ["buses", "cherries", "knives", "toys", "fire trucks"]


def test_the_world_is_the_same_in_two_processes(tmp_path):
    """Scenes, detector, every feature shard and the vocabulary, byte for byte, whatever the hash seed."""
    for seed in ["1", "2"]:
        script = f"import toy; toy.make_toy_world({str(tmp_path / seed)!r}, seed=3, scale=0.01)"
        subprocess.run([sys.executable, "-c", script], cwd=HERE, check=True, env={**os.environ, "PYTHONHASHSEED": seed},
                       stdout=subprocess.DEVNULL)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "1") for d, _, fs in os.walk(tmp_path / "1") for f in fs)
    assert "detector.npz" in files and "scenes.json" in files and any(f.endswith(".features.npy") for f in files)
    for rel in files:
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "2" / rel).read_bytes(), rel


def test_detector_report(world):
    r = toy.detector_report(world)
    assert r["classes"] == 330 and r["tags_are_read_out"] == 1.0
    assert set(r["probe"]) == {"all", "1", "5", "10", "30"} and r["probe"]["1"] <= r["probe"]["30"]
    assert set(r["tasks"]) == {"vqa", "nlvr2", "flickr30k", "refcoco"}
    for t in r["tasks"].values():
        assert 1 <= t["subset_examples"] <= t["train_examples"] and 0 <= t["subset_classes_under_5"] <= 1
    assert 0.1 < r["caption_class_word_share"] < 0.35


@pytest.mark.parametrize("case", ["unknown id", "root is a file"])
def test_show_with_a_bad_id_or_root_is_one_line(world, tmp_path, case):
    """toy.py --show (issue 24): an unknown image id, or a --root that is a file, is one line naming it."""
    if case == "unknown id":
        args, named = ["--root", world, "--show", "nope123"], "nope123"
    else:
        (tmp_path / "afile").write_text("x")
        args, named = ["--root", str(tmp_path / "afile"), "--show", "pt000001"], str(tmp_path / "afile")
    p = subprocess.run([sys.executable, os.path.join(HERE, "toy.py"), *args], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and named in p.stderr


def test_task_train_images_are_the_training_examples_tasks_py_loads(world):
    """detector_report counts the classes of the 1/16 training sets that finetune.py keeps: the same
    examples, in the same order, as the loaders of tasks.py."""
    t, f = os.path.join(world, "tasks"), lambda *p: os.path.join(world, "features", *p)
    images = lambda *names: data.Images([f(n) for n in names])
    ours = toy.task_train_images(world)
    vqa = tasks.load_vqa(os.path.join(t, "vqa", "v2_OpenEnded_mscoco_train2014_questions.json"),
                         os.path.join(t, "vqa", "v2_mscoco_train2014_annotations.json"), images("vqa_train"), tasks.Skipped())
    nlvr2 = tasks.load_nlvr2(os.path.join(t, "nlvr2", "train.json"), images("nlvr2_train"), tasks.Skipped())
    flickr = tasks.load_karpathy(os.path.join(t, "flickr30k", "dataset_flickr30k.json"), images("flickr30k"), tasks.Skipped())
    ref = tasks.load_refcoco(os.path.join(t, "refcoco+", "refs(unc).p"), os.path.join(t, "refcoco+", "instances.json"),
                             images("refcoco"), tasks.Skipped())
    assert ours["vqa"] == [[x["image"]] for x in vqa]
    assert ours["nlvr2"] == [list(x["images"]) for x in nlvr2]
    assert ours["flickr30k"] == [[x["image"]] for x in flickr["train"]]
    assert ours["refcoco"] == [[x["image"]] for x in ref["train"]]


def test_a_world_of_an_earlier_version_is_built_again_with_the_same_pretraining_data(tmp_path):
    """v3 changes the tasks only (docs/METHOD.md section 14): a v2 world (its `done` file empty) is built
    again, and its pre-training files come out byte for byte the same."""
    root = toy.make_toy_world(str(tmp_path / "w"), seed=3, scale=0.01, log=lambda *a: None)
    read = lambda *p: open(os.path.join(root, *p), "rb").read()
    before = read("pretrain", "pairs.jsonl"), read("pretrain", "text.txt")
    nlvr2 = read("tasks", "nlvr2", "train.json")
    open(os.path.join(root, "tasks", "nlvr2", "train.json"), "w").write("v2's sentences\n")
    open(os.path.join(root, "done"), "w").close()  # as v2 left it
    said = []
    toy.make_toy_world(root, seed=3, scale=0.01, log=said.append)
    assert read("done").decode().strip() == str(toy.VERSION) and "earlier version" in said[0]
    assert (read("pretrain", "pairs.jsonl"), read("pretrain", "text.txt")) == before
    assert read("tasks", "nlvr2", "train.json") == nlvr2


def test_every_which_question_has_one_right_class_and_nlvr2_sentences_are_lookups(world):
    """VQA's "which N is in the scene?" names a group of which exactly one class is in the scene, and
    that class is the answer; NLVR2's sentences are its two lookup templates, their labels what the
    scenes show."""
    import json
    scenes = json.load(open(os.path.join(world, "scenes.json")))
    nouns = {toy.GROUP_NOUN.get(g, g): g for g in toy.GROUPS}
    t = os.path.join(world, "tasks")
    questions = json.load(open(os.path.join(t, "vqa", "v2_OpenEnded_mscoco_train2014_questions.json")))["questions"]
    answers = {a["question_id"]: a for a in json.load(open(os.path.join(t, "vqa", "v2_mscoco_train2014_annotations.json")))["annotations"]}
    which = [q for q in questions if q["question"].startswith("which ")]
    assert which and not [q for q in questions if q["question"].startswith("what is ")]
    for q in which:
        group = nouns[q["question"][len("which "):-len(" is in the scene?")]]
        present = {o["class"] for o in toy.things(scenes[str(q["image_id"])]) if toy.GROUP_OF[o["class"]] == group}
        assert present == {answers[q["question_id"]]["multiple_choice_answer"]}
    forms = set()
    for line in open(os.path.join(t, "nlvr2", "train.json")):
        x = json.loads(line)
        left, right = (scenes[x["identifier"].rsplit("-", 1)[0] + f"-img{k}"] for k in (0, 1))
        has = lambda s, c: any(o["class"] == c for o in toy.things(s))
        if x["sentence"].startswith("there is a "):
            truth = has(left, x["sentence"][len("there is a "):-len(" in the left image .")])
        else:
            assert x["sentence"].startswith("both images contain a ")
            c = x["sentence"][len("both images contain a "):-len(" .")]
            truth = has(left, c) and has(right, c)
        forms.add(x["sentence"].split()[0])
        assert str(truth) == x["label"]
    assert forms == {"there", "both"}
