"""One bad item in a large batch is skipped, named and counted, and the run goes on with the good ones; more than
storage.MAX_BAD_SHARE of a file bad stops the run with one line naming the file, the first bad record and the share.
Each kind: bottom-up TSV rows, aligned pairs, caption lines, task records. Then the small refusals: a store of
other settings names the setting, --boxes 0, --seeds 0, ask.py's empty or too long text, bench.py's -h."""

import base64
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import data  # noqa: E402
import storage  # noqa: E402
import extract_features as ef  # noqa: E402
import finetune as ft  # noqa: E402
import pretrain  # noqa: E402
import reproduce  # noqa: E402
import tasks  # noqa: E402
from model import Config, VisualBERT  # noqa: E402
from toy import CLASSES, COLORS, FEATURE_DIM, make_toy_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


@pytest.fixture(scope="module")
def ckpt(toy, tmp_path_factory):
    """A checkpoint that fits the toy world, as pretrain.py writes one."""
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    cfg = Config(vocab_size=len(vocab), hidden=32, layers=1, heads=2, ffn=64, max_positions=64,
                 feat_dim=FEATURE_DIM, num_labels=len(CLASSES), num_attrs=len(COLORS))
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    torch.save({"model": VisualBERT(cfg).state_dict(), "config": cfg.to_dict(), "vocab": vocab.tokens,
                "class_names": CLASSES}, path)
    return path


def one_line(e):
    """The message of a SystemExit: one line, which Python prints alone with exit status 1."""
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def lines_of(path):
    with open(path) as f:
        return f.read().splitlines()


def test_the_threshold_is_one_rule():
    assert storage.MAX_BAD_SHARE == 0.1
    storage.check_bad_share(1, 10, "f: line 1: bad")  # a tenth: skipped
    with pytest.raises(ValueError, match=r"^f: line 1: bad; 2 of 11 records bad \(18%\), more than the 10% a run skips$"):
        storage.check_bad_share(2, 11, "f: line 1: bad")


# -----------------------------------------------------------------------------
# bottom-up-attention TSV rows


def tsv_rows(n, rng):
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    rows = []
    for i in range(n):
        K, w, h = 3, 100, 80
        boxes = np.array([[0, 0, 50, 40], [10, 10, 90, 70], [5, 5, 20, 20]], np.float32)
        r = dict(img_id=f"im{i}", img_h=h, img_w=w, objects_id=rng.integers(0, 1600, K), objects_conf=rng.random(K, np.float32),
                 attrs_id=rng.integers(0, 400, K), attrs_conf=rng.random(K, np.float32), num_boxes=K, boxes=boxes,
                 features=rng.standard_normal((K, 8)).astype(np.float32))
        rows.append("\t".join(b64(v) if isinstance(v, np.ndarray) else str(v) for v in (r[k] for k in ef.TSV_FIELDS)))
    return rows


def test_one_bad_tsv_row_is_skipped_and_listed(tmp_path, capsys):
    rows = tsv_rows(12, np.random.default_rng(0))
    rows[4] = rows[4].replace("\t3\t", "\tthree\t", 1)  # num_boxes not a number
    (tmp_path / "f.tsv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "store")
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--out", out, "--shard-size", "5"])
    assert sorted(storage.FeatureStore(out).ids()) == sorted(f"im{i}" for i in range(12) if i != 4)  # the good rows kept
    [line] = lines_of(os.path.join(out, "skipped.txt"))
    assert line.startswith(f"{tmp_path / 'f.tsv'} row 5\tnot a bottom-up-attention TSV row")
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"skipped 1 bad rows, listed in {out}/skipped.txt")
    ef.main(["--from-tsv", str(tmp_path / "f.tsv"), "--out", out])  # a rerun lists it once
    assert lines_of(os.path.join(out, "skipped.txt")) == [line]


def test_many_bad_tsv_rows_stop_the_import_with_one_line(tmp_path):
    rows = tsv_rows(10, np.random.default_rng(0))
    for i in (2, 5):
        rows[i] = "\t".join(rows[i].split("\t")[:5])  # cut short
    (tmp_path / "f.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "store"
    r = subprocess.run([sys.executable, "extract_features.py", "--from-tsv", str(tmp_path / "f.tsv"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"{tmp_path / 'f.tsv'}: row 3 is not a bottom-up-attention TSV row")
    assert "; 2 of 10 rows bad (20%), more than the 10% a run skips" in r.stderr
    # the 8 good rows are whole shards of the store, the bad ones listed: a rerun on a fixed file goes on from them
    assert len(storage.FeatureStore(str(out))) == 8 and len(lines_of(out / "skipped.txt")) == 2


# -----------------------------------------------------------------------------
# aligned pairs and caption lines (pretrain.py)


def pretrain_argv(toy, ckpt, out, *flags):
    feats = os.path.join(toy, "features", "pretrain")
    return ["--init-from", ckpt, "--images", feats, "--text", os.path.join(toy, "pretrain", "text.txt"),
            "--cache-dir", str(out) + ".cache", "--max-steps", "1", "--batch-size", "8", "--eval-batches", "1",
            "--out", str(out), *flags]


def with_lines(src, dst, extra):
    with open(src, "rb") as f:
        good = f.read()
    dst.write_bytes(good + b"".join(extra))
    return str(dst), good.count(b"\n")


def test_a_pair_naming_an_image_in_no_store_is_skipped_and_counted(toy, ckpt, tmp_path, capsys):
    pairs, n = with_lines(os.path.join(toy, "pretrain", "pairs.jsonl"), tmp_path / "pairs.jsonl",
                          [b'{"image_id": "nowhere", "caption": "a red car ."}\n'])
    pretrain.main(pretrain_argv(toy, ckpt, tmp_path / "out", "--aligned", "--pairs", pairs))
    out = capsys.readouterr().out
    assert f"data: pairs:pairs.jsonl (pair), {n} items" in out  # the good pairs, all of them
    warning = f"warning: {pairs}: skipped 1 pair(s) naming images that no feature store in --images holds, e.g. ['nowhere']"
    assert out.count(warning) == 2  # at the start and at the end
    assert os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_many_pairs_naming_no_stored_image_stop_the_run(toy, ckpt, tmp_path):
    src = os.path.join(toy, "pretrain", "pairs.jsonl")
    k = len(lines_of(src)) // 4  # a fifth of the pairs bad: over the tenth a run skips
    pairs, n = with_lines(src, tmp_path / "pairs.jsonl",
                          [f'{{"image_id": "nowhere{i}", "caption": "a car ."}}\n'.encode() for i in range(k)])
    with pytest.raises(SystemExit) as e:
        pretrain.main(pretrain_argv(toy, ckpt, tmp_path / "out", "--aligned", "--pairs", pairs))
    message = one_line(e)
    assert message.startswith(f"{pairs}: {k} pairs naming images that no feature store in --images holds, e.g. ")
    assert message.endswith(f"; {k} of {n + k} lines bad ({k / (n + k):.0%}), more than the 10% a run skips")
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_many_bad_caption_lines_stop_the_run_a_few_are_skipped(toy, ckpt, tmp_path, capsys):
    src = os.path.join(toy, "pretrain", "captions.txt")
    few, n = with_lines(src, tmp_path / "few.txt", [b"not \xff UTF-8\n"])
    pretrain.main(pretrain_argv(toy, ckpt, tmp_path / "out", "--unaligned", "--captions", few))
    out = capsys.readouterr().out
    assert f"data: captions:few.txt (caption), {n} items" in out
    assert f"warning: {few}: skipped 1 bad line(s) (line {n + 1}: not valid UTF-8" in out
    k = len(lines_of(src)) // 4  # a fifth of the lines bad: over the tenth a run skips
    many, n = with_lines(src, tmp_path / "many.txt", [b"not \xff UTF-8\n"] * k)
    with pytest.raises(SystemExit) as e:
        pretrain.main(pretrain_argv(toy, ckpt, tmp_path / "out2", "--unaligned", "--captions", many))
    assert one_line(e) == (f"{many}: line {n + 1}: not valid UTF-8 (byte 0xff at column 5); {k} of {n + k} lines bad "
                           f"({k / (n + k):.0%}), more than the 10% a run skips")
    assert not os.path.exists(tmp_path / "out2")


# -----------------------------------------------------------------------------
# task records


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding the images the records below name."""
    path = str(tmp_path_factory.mktemp("store") / "store")
    w = storage.FeatureWriter(path, 4, ["cat"])
    ids = [str(i) for i in range(40)] + [f"dev-{i}-0-img{k}" for i in range(40) for k in (0, 1)]
    for i in ids:
        w.add(i, np.ones((2, 4), np.float32), np.array([[0, 0, 1, 1]] * 2, np.float32), [0, 0], [0.9, 0.9], 10, 10)
    w.close()
    return data.Images([path])


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def vqa(tmp_path, n, unanswered):
    """n questions on images 0..n-1; the first `unanswered` have no annotation."""
    q = write(tmp_path / "questions.json", {"questions": [{"image_id": i, "question": "?", "question_id": i} for i in range(n)]})
    a = write(tmp_path / "annotations.json", {"annotations": [
        {"question_id": i, "question_type": "what", "answers": [{"answer": "yes"}] * 10} for i in range(unanswered, n)]})
    return q, a


def nlvr2(tmp_path, n, bad):
    lines = [{"identifier": f"dev-{i}-0-1", "sentence": "x", "label": "True"} for i in range(n)]
    for i in range(bad):
        del lines[i]["label"]
    with open(tmp_path / "dev.json", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    return str(tmp_path / "dev.json")


def karpathy(tmp_path, n, bad):
    ims = [{"filename": f"{i}.jpg", "split": "training" if i < bad else "test", "sentences": [{"raw": "a cat ."}]}
           for i in range(n)]
    return write(tmp_path / "dataset_flickr30k.json", {"images": ims})


def refcoco(tmp_path, n, bad):
    refs = [{"ref_id": i, "ann_id": 6 if i < bad else 5, "image_id": 0, "split": "val", "sentences": [{"sent": "the cat"}]}
            for i in range(n)]
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    write(tmp_path / "instances.json", {"images": [{"id": 0, "width": 100, "height": 50}],
                                        "annotations": [{"id": 5, "image_id": 0, "bbox": [0, 0, 50, 25]}]})
    return str(tmp_path / "refs(unc).p"), str(tmp_path / "instances.json")


LOADERS = {  # name -> (files of n records, the first `bad` malformed), load, the skip's words, how many are kept
    "vqa": (vqa, lambda f, store, s: tasks.load_vqa(*f, store, s), "record 0 (question_id 0): ", "has no annotation for this question"),
    "nlvr2": (nlvr2, lambda f, store, s: tasks.load_nlvr2(f, store, s), "line 1 (dev-0-0-1) has no field 'label'", ""),
    "karpathy": (karpathy, lambda f, store, s: tasks.load_karpathy(f, store, s)["test"],
                 "image record 0 (0.jpg): unknown split 'training'", ""),
    "refcoco": (refcoco, lambda f, store, s: tasks.load_refcoco(*f, store, s)["val"],
                "record 0 (ref_id 0): annotation 6 is not in ", "instances.json"),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_one_malformed_task_record_is_skipped_and_counted(tmp_path, store, name):
    make, load, where, more = LOADERS[name]
    files = make(tmp_path, 30, 1)
    skipped = tasks.Skipped()
    assert len(load(files, store, skipped)) == 29  # the good records, all of them
    file = files[0] if isinstance(files, tuple) else files
    [(n, first)] = skipped.files.values()
    assert n == 1 and first.startswith(where) and more in first
    assert skipped.lines() == [f"skipped 1 records of {file}: first: {first}"]


@pytest.mark.parametrize("name", list(LOADERS))
def test_many_malformed_task_records_stop_the_run(tmp_path, store, name):
    make, load, where, more = LOADERS[name]
    files = make(tmp_path, 30, 4)
    file = files[0] if isinstance(files, tuple) else files
    with pytest.raises(ValueError) as e:
        load(files, store, tasks.Skipped())
    message = str(e.value)
    assert message.startswith(f"{file}: {where}") and more in message and "\n" not in message
    assert message.endswith("; 4 of 30 records bad (13%), more than the 10% a run skips")


def test_a_question_without_its_annotation_in_a_whole_run(toy, ckpt, tmp_path, capsys):
    """finetune.py on the toy VQA files, one training question added without an annotation: it is skipped,
    said at the start and the end, and counted in results.json."""
    src = os.path.join(toy, "tasks", "vqa")
    for f in os.listdir(src):
        obj = storage.read_json(os.path.join(src, f))
        if f == "v2_OpenEnded_mscoco_train2014_questions.json":
            obj["questions"].append({**obj["questions"][0], "question_id": 999999999})
            n = len(obj["questions"])
        write(tmp_path / f, obj)
    feats = os.path.join(toy, "features")
    results = ft.main(["--task", "vqa", "--data", str(tmp_path), "--init-from", ckpt, "--epochs", "0.01",
                       "--min-answer-count", "1", "--features", f"{feats}/vqa_train", f"{feats}/vqa_val", "--out", str(tmp_path / "out")])
    file = str(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json")
    assert results["skipped"] == {file: 1} and storage.read_json(tmp_path / "out" / "results.json")["skipped"] == {file: 1}
    line = (f"warning: skipped 1 records of {file}: first: record {n - 1} (question_id 999999999): "
            f"{tmp_path / 'v2_mscoco_train2014_annotations.json'} has no annotation for this question")
    assert capsys.readouterr().out.count(line) == 2


# -----------------------------------------------------------------------------
# the small refusals


def test_a_store_of_other_settings_names_the_setting_and_both_values(tmp_path):
    storage.FeatureWriter(str(tmp_path), 8, ["car"], extractor={"box_policy": "fixed 36", "nms": 0.3}).close()
    with pytest.raises(ValueError) as e:
        storage.FeatureWriter(str(tmp_path), 8, ["car"], extractor={"box_policy": "fixed 10", "nms": 0.3})
    assert "other settings (extractor.box_policy 'fixed 36' (now 'fixed 10')); write to a new folder" in str(e.value)


def test_extraction_workers_default_to_what_the_machine_has():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert ef.parser.get_default("workers") == min(4, cores - 1)


@pytest.mark.parametrize("flag", ["--boxes", "--min-boxes", "--max-boxes"])
def test_zero_boxes_is_an_error_not_the_default(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        ef.main(["--weights", "none", "--images", str(tmp_path), "--out", str(tmp_path / "out"), flag, "0"])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"{ef.parser.prog}: error: {flag} 0 is not a whole number above 0 (see {ef.parser.prog} -h)"]
    assert not os.path.exists(tmp_path / "out")


def test_zero_seeds_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce.toy, "make_toy_world", lambda *a: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--seeds", "0", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"{reproduce.parser.prog}: error: --seeds 0 is not a whole number above 0 (see {reproduce.parser.prog} -h)"]
    assert os.listdir(tmp_path) == []


def test_every_bench_flag_has_help_and_its_default():
    for action in bench.parser._actions:
        assert action.help, action.dest
        if action.default not in (None, False) and action.dest != "help":
            assert "%(default)s" in action.help, action.dest
    assert "tokens/s: N" in bench.parser.format_help()  # the whole docstring, not its first line


@pytest.fixture(scope="module")
def vqa_ckpt(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    ft.main(["--task", "vqa", "--toy-root", toy, "--epochs", "0.01", "--min-answer-count", "1", "--out", str(out)])
    return str(out / "ckpt.pt")


@pytest.mark.parametrize("text, says", [
    ("  ", r"the text \(the last argument\) is empty: give the question or sentence to ask about"),
    ("what color is the chef? " * 209, r"the text is \d+ word pieces long \(5016 characters\); a vqa model takes at most 18"),
], ids=["empty", "5,016 characters"])
def test_ask_refuses_an_empty_or_too_long_question(vqa_ckpt, text, says):
    r = subprocess.run([sys.executable, "ask.py", vqa_ckpt, "200000", text], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and re.fullmatch(says + "\n", r.stderr) and r.stdout == "", r.stderr
