"""pretrain.py end to end on a small toy world: every variant, the log, checkpoints, bad input."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import storage  # noqa: E402
import data  # noqa: E402
from toy import CLASSES, COLORS, FEATURE_DIM, make_toy_world  # noqa: E402
import pretrain  # noqa: E402
from model import VisualBERT  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def run(toy, out, *flags):
    return pretrain.main(["--toy-root", toy, "--out", str(out), "--cache-dir", os.path.join(toy, "cache"),
                          "--max-steps", "6", "--batch-size", "8", "--log-every", "1", "--eval-batches", "1", *flags])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


EXPECTED = {  # variant -> objectives each kind of batch must log
    ("--unaligned",): {"text": {"mlm"}, "images": {"tag", "feat", "label", "attr"}, "captions": {"mlm"}},
    ("--unaligned", "--no-tags"): {"text": {"mlm"}, "images": {"feat", "label", "attr"}, "captions": {"mlm"}},
    ("--unaligned", "--no-captions"): {"text": {"mlm"}, "images": {"tag", "feat", "label", "attr"}},
    ("--aligned",): {"text": {"mlm"}, "pairs": {"mlm", "match", "tag", "feat", "label", "attr"}},
    ("--aligned", "--no-tags"): {"text": {"mlm"}, "pairs": {"mlm", "match", "feat", "label", "attr"}},
    ("--hybrid",): {"text": {"mlm"}, "pairs": {"mlm", "match", "tag", "feat", "label", "attr"}, "images": {"tag", "feat", "label", "attr"}},
    ("--text-only",): {"text": {"mlm"}},
    ("--text-only", "--nsp"): {"text": {"mlm", "nsp"}},
}


@pytest.mark.parametrize("flags", list(EXPECTED), ids=[" ".join(f) for f in EXPECTED])
def test_every_variant_runs(toy, tmp_path, flags, capsys):
    after = run(toy, tmp_path, *flags, "--max-steps", "40")
    printed = capsys.readouterr().out
    lines = lambda f: sum(1 for line in open(os.path.join(toy, "pretrain", f)) if line.strip())
    sizes = {"pair": lines("pairs.jsonl"), "caption": lines("captions.txt"), "image": None, "text": None}
    for kind, n in sizes.items():  # each data set is as large as its source
        if n is not None and f"({kind})" in printed:
            assert f"({kind}), {n} items" in printed, printed
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 41))
    kinds = {}
    for r in log:
        kind = r["modality"].split(":")[0]
        assert {"step", "loss", "lr", "modality"} <= set(r)
        assert abs(r["loss"] - sum(r[k] for k in EXPECTED[flags][kind])) < 1e-4 * max(1, r["loss"])
        kinds.setdefault(kind, set()).update(k for k in r if k not in ("step", "loss", "lr", "modality", "grad_norm"))
    assert kinds == EXPECTED[flags]  # every data set of the variant was drawn, each with its objectives
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 40 and set(ckpt) >= {"model", "optimizer", "config", "vocab", "args", "rng"}
    assert os.path.exists(tmp_path / "args.json")
    if "--no-tags" in flags:
        assert "tag" not in after
    if "--text-only" in flags:
        assert set(after) == {"mlm"}


def test_worker_processes_change_nothing_even_across_a_resume(toy, tmp_path, kill_at):
    """--workers 2 (batches built in other processes, handed over in shared memory), killed after
    the checkpoint at step 6 and resumed: the same log as one process building every batch."""
    common = ("--hybrid", "--max-steps", "10", "--save-every", "6")  # pairs, images and text: batches of every shape
    run(toy, tmp_path / "here", *common, "--workers", "0")
    kill_at(pretrain, "train_flops", 8)  # called once per step, after the optimiser step
    with pytest.raises(KeyboardInterrupt):
        run(toy, tmp_path / "workers", *common, "--workers", "2")
    run(toy, tmp_path / "workers", *common, "--workers", "2", "--resume")
    here, workers = read_log(tmp_path / "here"), read_log(tmp_path / "workers")
    assert [r["step"] for r in workers] == list(range(1, 11))
    assert workers == here


def test_no_tags_puts_no_tag_tokens_in_the_sequence(toy, tmp_path, monkeypatch):
    lengths = []
    real = VisualBERT.forward

    def spy(self, input_ids=None, attention_mask=None, token_type_ids=None, tag_ids=None, tag_boxes=None, tag_mask=None,
            feats=None, boxes=None, region_mask=None):
        lengths.append((tag_ids is not None, feats is not None))
        return real(self, input_ids, attention_mask, token_type_ids, tag_ids, tag_boxes, tag_mask, feats, boxes, region_mask)

    monkeypatch.setattr(VisualBERT, "forward", spy)
    run(toy, tmp_path / "nt", "--unaligned", "--no-tags", "--max-steps", "30")
    assert any(has_feats for _, has_feats in lengths) and not any(has_tags for has_tags, _ in lengths)
    lengths.clear()
    run(toy, tmp_path / "t", "--unaligned", "--max-steps", "30")
    assert any(has_tags for has_tags, _ in lengths)


def test_init_from_text_only_checkpoint_and_huggingface(toy, tmp_path):
    run(toy, tmp_path / "bert", "--text-only")
    base = torch.load(tmp_path / "bert" / "ckpt.pt", weights_only=False)["model"]
    run(toy, tmp_path / "u", "--unaligned", "--init-from", str(tmp_path / "bert" / "ckpt.pt"), "--max-steps", "1", "--lr", "0")
    u = torch.load(tmp_path / "u" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(base[k], u[k]) for k in base)  # lr 0: the weights came through unchanged
    # a Hugging Face BERT directory, its vocabulary used for the toy text
    transformers = pytest.importorskip("transformers")
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    hf_dir = tmp_path / "hf"
    transformers.BertForPreTraining(transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)).save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").write_text("\n".join(vocab.tokens) + "\n")
    run(toy, tmp_path / "from_hf", "--unaligned", "--init-from", str(hf_dir))
    assert torch.load(tmp_path / "from_hf" / "ckpt.pt", weights_only=False)["config"]["hidden"] == 32


def test_bad_input_gets_one_clear_line(toy, tmp_path):
    store = os.path.join(toy, "features", "pretrain")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xc3\x28 broken\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["--unaligned", "--out", str(tmp_path / "o"), "--init-from", str(tmp_path / "ck" / "ckpt.pt"), "--max-steps", "2"]
    run(toy, tmp_path / "ck", "--text-only")
    for extra, message in [
        (["--images", str(tmp_path / "nowhere"), "--text", str(bad)], "nowhere: not found"),
        (["--images", store, "--text", str(bad)], r"bad.txt: no usable line \(1 bad, the first: line 1, not valid UTF-8"),
        (["--images", store, "--text", str(empty)], "empty.txt: the file is empty"),
    ]:
        with pytest.raises(SystemExit, match=message):
            pretrain.main(base + extra + ["--cache-dir", str(tmp_path / "cache")])
    # a checkpoint made for other features than the images given
    other = tmp_path / "wide"
    w = storage.FeatureWriter(str(other), 32, CLASSES, attr_names=COLORS, extractor={"other": True})
    w.add("x", np.zeros((2, 32)), np.zeros((2, 4)), [0, 1], [0.5, 0.5], 10, 10, [0, 0], [0.5, 0.5])
    w.close()
    with pytest.raises(SystemExit, match=rf"ckpt.pt: the checkpoint has feat_dim={FEATURE_DIM}, the images have 32"):
        pretrain.main(base + ["--images", str(other), "--text", os.path.join(toy, "pretrain", "text.txt"), "--cache-dir", str(tmp_path / "cache")])


def test_bad_lines_are_skipped_counted_and_reported(toy, tmp_path, capsys):
    text = tmp_path / "text.txt"
    good = open(os.path.join(toy, "pretrain", "text.txt"), "rb").read()
    text.write_bytes(good + b"\nbroken \xff line\n")
    run(toy, tmp_path / "o", "--text-only", "--text", str(text), "--init-from", str(_bert(toy, tmp_path)))
    out = capsys.readouterr().out
    n = good.count(b"\n") + 2  # the line after the good text and the added newline
    line = f"warning: {text}: skipped 1 bad line(s) (line {n}: not valid UTF-8 (byte 0xff at column 8))"
    assert out.count(line) == 2  # at the start and again at the end


def _bert(toy, tmp_path):
    run(toy, tmp_path / "bert", "--text-only", "--max-steps", "1")
    return tmp_path / "bert" / "ckpt.pt"
