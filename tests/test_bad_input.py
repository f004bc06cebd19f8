"""Bad input across the four scripts: every flag that names a path, given a path that is missing, empty,
a folder where a file is wanted (or the other way round), unreadable, or of the wrong format, stops the
run with one line naming the file, a non-zero exit and nothing written."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import storage  # noqa: E402
import data  # noqa: E402
from toy import CLASSES, COLORS, FEATURE_DIM, make_toy_world  # noqa: E402
import extract_features as ef  # noqa: E402
import finetune as ft  # noqa: E402
import pretrain  # noqa: E402
import reproduce  # noqa: E402
from model import Config, VisualBERT  # noqa: E402

MAINS = {"pretrain": pretrain.main, "finetune": ft.main, "extract": ef.main, "reproduce": reproduce.main}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The toy world, a checkpoint that fits it, and bad inputs of every kind in one folder ({i} in CASES)."""
    toy = make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)
    d = tmp_path_factory.mktemp("inputs")
    e = {"toy": toy, "in": str(d), "cache": str(tmp_path_factory.mktemp("cache")), "missing": str(d / "nowhere.txt")}
    (d / "empty.txt").write_text("")
    (d / "notes.txt").write_text("just some words\nand more words\n")
    (d / "garbage.bin").write_bytes(b"\xff\x00\x81 not text\n" * 50)
    (d / "unreadable.txt").write_text("hidden words\n")
    os.chmod(d / "unreadable.txt", 0)
    os.makedirs(d / "folder")
    (d / "folder" / "readme.txt").write_text("a folder with no images, no store, no task files\n")
    os.makedirs(d / "badmeta")
    (d / "badmeta" / "meta.json").write_text("{not json")
    storage.FeatureWriter(str(d / "nostore"), 4, ["cat"]).close()  # a store's meta.json and no images
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "photo.png")
    os.makedirs(d / "images")
    Image.new("RGB", (48, 40), (20, 90, 200)).save(d / "images" / "one.png")
    (d / "list.json").write_text("[1, 2, 3]")
    (d / "ans2label.json").write_text('{"yes": 0, "no": 5}')
    (d / "boxes.json").write_text('{"one": [[1, 2, 3]]}')
    (d / "weights.pth").write_bytes(b"not a torch file")
    torch.save({"state_dict": {}}, d / "other.pt")
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    cfg = Config(vocab_size=len(vocab), hidden=32, layers=1, heads=2, ffn=64, max_positions=64,
                 feat_dim=FEATURE_DIM, num_labels=len(CLASSES), num_attrs=len(COLORS))
    torch.save({"model": VisualBERT(cfg).state_dict(), "config": cfg.to_dict(), "vocab": vocab.tokens,
                "class_names": CLASSES}, d / "ckpt.pt")
    # task folders with one bad file each: VQA annotations that are not JSON, or a folder; NLVR2 lines not text
    for name, bad in (("vqa_badjson", "garbage"), ("vqa_folder", "folder")):
        os.makedirs(d / name)
        for sub in ("train2014", "val2014"):
            q = f"v2_OpenEnded_mscoco_{sub}_questions.json"
            (d / name / q).write_bytes(open(os.path.join(toy, "tasks", "vqa", q), "rb").read())
            a = d / name / f"v2_mscoco_{sub}_annotations.json"
            os.makedirs(a) if bad == "folder" else a.write_bytes(b"\xff{{{")
    os.makedirs(d / "nlvr2_binary")
    (d / "nlvr2_binary" / "train.json").write_bytes(b"\xff\xfe\x00garbage\n")
    return e


def commands(e):
    """Good command lines of each script on the toy world; a case appends one flag with a bad path."""
    toy, feats = e["toy"], os.path.join(e["toy"], "features")
    real = (f"--init-from {e['in']}/ckpt.pt --images {feats}/pretrain --text {toy}/pretrain/text.txt "
            f"--cache-dir {e['cache']} --max-steps 1")
    return {
        "i": e["in"],
        # pretrain.py on real data: the toy world's files named by flags, U or S
        "pre": f"--unaligned {real}",
        "pre_s": f"--aligned {real}",
        "vqa": f"--task vqa --data {toy}/tasks/vqa --init-from {e['in']}/ckpt.pt --epochs 0.01 "
               f"--features {feats}/vqa_train {feats}/vqa_val",
        "nlvr2": f"--task nlvr2 --init-from {e['in']}/ckpt.pt --epochs 0.01 "
                 f"--features {feats}/nlvr2_train {feats}/nlvr2_dev {feats}/nlvr2_test1",
        "toyvqa": f"--task vqa --toy-root {toy} --epochs 0.01 --min-answer-count 1",
        "ext": f"--weights none --min-size 64 --max-size 96 --proposals 10 --boxes 4 --workers 0"
               f" --images {e['in']}/images",
        "train": f"{toy}/tasks/vqa/v2_mscoco_train2014_annotations.json",
    }


# (script, command line, words the message must say[, the file it must name: else the command's last path]);
# {i} is the folder of bad inputs
CASES = [
    # pretrain.py
    ("pretrain", "{pre} --text {i}/nowhere.txt", "not found"),
    ("pretrain", "{pre} --text {i}/empty.txt", "the file is empty"),
    ("pretrain", "{pre} --text {i}/folder", "a folder, where a file is wanted"),
    ("pretrain", "{pre} --text {i}/unreadable.txt", "cannot be read"),
    ("pretrain", "{pre} --text {i}/garbage.bin", "no usable line"),
    ("pretrain", "{pre} --captions {i}/folder", "a folder"),
    ("pretrain", "{pre} --captions {i}/garbage.bin", "not valid UTF-8"),
    ("pretrain", "{pre_s} --pairs {i}/notes.txt", "not a JSON object with image_id and caption"),
    ("pretrain", "{pre} --images {i}/nowhere.txt", "not found"),
    ("pretrain", "{pre} --images {i}/notes.txt", "a file, where a folder is wanted"),
    ("pretrain", "{pre} --images {i}/folder", "not a feature store"),
    ("pretrain", "{pre} --images {i}/badmeta", "not valid JSON", "{i}/badmeta/meta.json"),
    ("pretrain", "{pre} --images {i}/nostore", "no images"),
    ("pretrain", "{pre} --heldout-images {i}/folder", "not a feature store"),
    ("pretrain", "{pre} --heldout-captions {i}/garbage.bin", "no usable line"),
    ("pretrain", "{pre} --heldout-text {i}/empty.txt", "the file is empty"),
    ("pretrain", "{pre} --init-from {i}/nowhere.txt", "not found"),
    ("pretrain", "{pre} --init-from {i}/folder", "not found", "{i}/folder/config.json"),
    ("pretrain", "{pre} --init-from {i}/notes.txt", "not a readable checkpoint"),
    ("pretrain", "{pre} --init-from {i}/other.pt", "not a checkpoint of pretrain.py"),
    ("pretrain", "{pre} --out {i}/notes.txt", "is a file, where a folder is wanted"),
    ("pretrain", "{pre} --cache-dir {i}/notes.txt", "is a file"),
    ("pretrain", "--unaligned --toy-root {i}/notes.txt", "is a file"),
    # finetune.py
    ("finetune", "{vqa} --data {i}/nowhere.txt", "not found"),
    ("finetune", "{vqa} --data {i}/notes.txt", "a file, where a folder is wanted"),
    ("finetune", "{vqa} --data {i}/folder", "not found", "{i}/folder/v2_mscoco_train2014_annotations.json"),
    ("finetune", "{vqa} --data {i}/vqa_badjson",
     "not valid JSON", "{i}/vqa_badjson/v2_mscoco_train2014_annotations.json"),
    ("finetune", "{vqa} --data {i}/vqa_folder",
     "cannot be read", "{i}/vqa_folder/v2_mscoco_train2014_annotations.json"),
    ("finetune", "{nlvr2} --data {i}/nlvr2_binary", "cannot be read as text", "{i}/nlvr2_binary/train.json"),
    ("finetune", "{vqa} --features {i}/nowhere.txt", "not found"),
    ("finetune", "{vqa} --features {i}/folder", "not a feature store"),
    ("finetune", "{toyvqa} --answers {i}/nowhere.txt", "not found"),
    ("finetune", "{toyvqa} --answers {i}/empty.txt", "the file is empty"),
    ("finetune", "{toyvqa} --answers {i}/folder", "a folder"),
    ("finetune", "{toyvqa} --answers {i}/unreadable.txt", "cannot be read"),
    ("finetune", "{toyvqa} --answers {i}/notes.txt", "not valid JSON"),
    ("finetune", "{toyvqa} --answers {i}/list.json", "not a VQA annotations file"),
    ("finetune", "{toyvqa} --answers {i}/ans2label.json", "indices 0 to N-1"),
    ("finetune", "{toyvqa} --answers {i}/ans2label.json {train}", "goes alone", "{i}/ans2label.json"),
    ("finetune", "{vqa} --init-from {i}/nowhere.txt", "not found"),
    ("finetune", "{vqa} --init-from {i}/notes.txt", "not a readable checkpoint"),
    ("finetune", "{toyvqa} --out {i}/notes.txt", "is a file"),
    ("finetune", "{toyvqa} --toy-root {i}/notes.txt", "is a file"),
    # extract_features.py
    ("extract", "{ext} --images {i}/nowhere.txt", "not found"),
    ("extract", "{ext} --images {i}/photo.png", "an image; --images takes"),
    ("extract", "{ext} --images {i}/garbage.bin", "not a text file listing"),
    ("extract", "{ext} --images {i}/empty.txt", "the file is empty"),
    ("extract", "{ext} --images {i}/folder", "no images in this folder"),
    ("extract", "{ext} --out {i}/notes.txt", "is a file"),
    ("extract", "{ext} --given-boxes {i}/nowhere.txt", "not found"),
    ("extract", "{ext} --given-boxes {i}/notes.txt", "not valid JSON"),
    ("extract", "{ext} --given-boxes {i}/boxes.json", "not a list of [x1, y1, x2, y2]"),
    ("extract", "{ext} --given-boxes {i}/unreadable.txt", "cannot be read"),
    ("extract", "--from-tsv {i}/nowhere.txt", "not found"),
    ("extract", "--from-tsv {i}/notes.txt", "row 1 is not a bottom-up-attention TSV"),
    ("extract", "--from-tsv {i}/notes.txt --vocab {i}/garbage.bin", "not a list of names"),
    ("extract", "--from-tsv {i}/notes.txt --attr-vocab {i}/folder", "a folder"),
    ("extract", "{ext} --weights {i}/nowhere.pth", "not found"),
    ("extract", "{ext} --weights {i}/weights.pth", "not a state dict"),
    ("extract", "{ext} --weights NOPE", "nor a name of"),
    # reproduce.py
    ("reproduce", "--out {i}/notes.txt", "is a file"),
    ("reproduce", "--toy-root {i}/notes.txt", "is a file"),
]


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, ds, fs in os.walk(folder) for f in ds + fs)


@pytest.mark.parametrize("script, command, words, named", [c + (None,) * (4 - len(c)) for c in CASES],
                         ids=[f"{c[0]} {' '.join(c[1].split()[-2:])}".replace("{i}/", "") for c in CASES])
def test_bad_path_is_one_line_naming_it_and_writes_nothing(env, tmp_path, monkeypatch, script, command, words, named):
    if "unreadable" in command and os.access(os.path.join(env["in"], "unreadable.txt"), os.R_OK):
        pytest.skip("this user reads a file of mode 000 (root)")
    fill = commands(env)
    argv = command.format(**fill).split()  # no path here has a space
    named = named.format(**fill) if named else argv[-1]
    if script != "reproduce" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    monkeypatch.chdir(tmp_path)  # where a default output folder would go
    before = tree(env["in"])
    with pytest.raises(SystemExit) as e:
        MAINS[script](argv)
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message  # one line, printed by Python with exit status 1
    assert named in message and words in message, message
    assert tree(env["in"]) == before and os.listdir(tmp_path) == []  # nothing written: no output folder, nothing else
    assert all(os.path.exists(os.path.join(env["cache"], c, "done")) for c in os.listdir(env["cache"]))  # no half cache


@pytest.mark.parametrize("argv, says", [
    (["pretrain.py", "--unaligned", "--text", "{text}", "--out", "{out}"],
     "real data needs a vocabulary: give --init-from (a BERT directory or a checkpoint)"),
    (["extract_features.py", "--images", "{missing}", "--out", "{out}"], "--images {missing}: not found"),
])
def test_the_reported_cases_end_without_a_traceback(env, tmp_path, argv, says):
    fill = dict(text=os.path.join(env["toy"], "pretrain", "text.txt"), missing=env["missing"], out=tmp_path / "out")
    r = subprocess.run([sys.executable, *[a.format(**fill) for a in argv]], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip() == says.format(**fill)
    assert not os.path.exists(tmp_path / "out")
