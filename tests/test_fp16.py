"""fp16 (a V100's, a T4's): the loss scale holds and the run tracks fp32's. A masked region's features
are zeroed, so LN_feat's input there is W_feat's bias alone (zero at the start): LN's backward
multiplies the gradient by 1/sqrt(var + eps), up to 1e6, and W_feat's backward overflowed float16 on
every image step, so the scaler skipped each and fell from 65536 to single digits."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import pretrain  # noqa: E402
from data import with_positions  # noqa: E402
from model import PRESETS, Config, VisualBERT  # noqa: E402
from toy import make_toy_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def image_batch(toy, rows=16):
    """A masked image batch of the toy world (tags and regions, some regions zeroed), and a new tiny model."""
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    images = data.Images([os.path.join(toy, "features", "pretrain")])
    corpus = data.Corpus("images", "image", vocab, sorted(images.where), images)
    batch = with_positions(corpus.batch(np.arange(rows), data.RowRandom(0, 0, range(rows))))
    cfg = Config(**{**PRESETS["tiny"], "vocab_size": len(vocab), "feat_dim": images.feature_dim,
                    "num_labels": len(images.class_names), "num_attrs": len(images.attr_names), "dropout": 0.0})
    torch.manual_seed(0)
    return batch, VisualBERT(cfg)


def gradients(model, batch, dtype):
    """The true (unscaled) gradients of pretrain.py's loss on `batch`, taken as pretrain.py's loop takes them."""
    model.zero_grad(set_to_none=True)
    # 1024, not pretrain.py's 65536: at 65536 box.0.bias's true gradient (~1) may overflow too, which the scaler
    # is right to back off from; the singular LN_feat's (2e4 in W_feat's bias, 2e3 at W_feat's output) overflows at 1024
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=dtype == "fp16")
    counts = torch.stack(list(model.count_targets(batch).values())).clamp(min=1)
    with common.autocast(torch.device("cpu"), dtype):
        loss = (model.pretrain_loss(batch)[0] / counts).sum()
    scaler.scale(loss).backward()
    return {n: p.grad.float() / scaler.get_scale() if scaler.is_enabled() else p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def test_fp16_gradients_of_an_image_step_are_finite_and_fp32s(toy):
    batch, model = image_batch(toy)
    zeroed = (batch["region_masked"] & (batch["feats"].abs().sum(-1) == 0)).sum()
    assert zeroed > 0  # masked regions with zeroed features: LN_feat sees its bias alone
    want = gradients(model, batch, "fp32")
    assert want["embeddings.feat.0.bias"].abs().max() > 100  # the gradient the singular LN sends back, in fp32
    got = gradients(model, batch, "fp16")
    bad = [n for n, g in got.items() if not torch.isfinite(g).all()]
    assert not bad, bad  # the unmended code: embeddings.feat.0.weight and .bias non-finite
    for n in ("embeddings.feat.0.weight", "embeddings.feat.0.bias", "embeddings.box.0.weight", "layers.0.ffn_in.weight"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0.05 * want[n].abs().max().item(), msg=n)


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fp16_pretrain_keeps_its_loss_scale_and_tracks_fp32(toy, tmp_path):
    def run(dtype):
        out = tmp_path / dtype
        pretrain.main(["--unaligned", "--toy-root", toy, "--out", str(out), "--cache-dir", os.path.join(toy, "cache"),
                       "--batch-size", "8", "--max-steps", "12", "--log-every", "1", "--eval-batches", "1",
                       "--dtype", dtype])
        return log(out), torch.load(out / "ckpt.pt", weights_only=False)["scaler"]

    fp32, _ = run("fp32")
    fp16, scaler = run("fp16")
    assert sum(r["modality"] == "images" for r in fp32) >= 3  # image steps, where the overflow was
    # the scaler's first backoff or two are its own probing from 65536 (box.0.bias's true gradient is ~1 at the
    # start); the unmended code skipped every image step, and the scale fell to 65536 / 2^6 here
    assert scaler["scale"] >= 2.0 ** 14, scaler
    assert all(np.isfinite(r["grad_norm"]) for r in fp16[3:])  # no overflow after the first steps
    assert len(fp16) == len(fp32) == 12
    for a, b in zip(fp32, fp16):
        assert a["modality"] == b["modality"]
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1), (a["step"], a["modality"])
