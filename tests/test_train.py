"""The training step both scripts share: --grad-accum takes the step the whole batch takes, and the
host reads the device on logging and saving steps alone."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import storage  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
from toy import make_toy_world  # noqa: E402
import finetune  # noqa: E402
import pretrain  # noqa: E402
from data import with_positions  # noqa: E402
from model import PRESETS, Config, VisualBERT  # noqa: E402
from test_model import pretrain_losses  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(str(tmp_path_factory.mktemp("toy") / "world"), seed=0, scale=0.03)


def toy_batch(toy, kind="pair", rows=16):
    """A batch of the toy world, aligned (text, tags, regions) or of images alone (tags, regions, some zeroed),
    and a model for it, dropout 0."""
    vocab = data.Vocab.from_file(os.path.join(toy, "vocab.txt"))
    images = data.Images([os.path.join(toy, "features", "pretrain")])
    if kind == "pair":
        pairs = storage.TokenCorpus(os.path.join(toy, "pretrain", "pairs.jsonl"), vocab, "pairs", os.path.join(toy, "cache"))
        corpus = data.Corpus("pairs", "pair", vocab, (pairs, pairs.image_ids), images)
    else:
        corpus = data.Corpus("images", "image", vocab, sorted(images.where), images)
    batch = corpus.batch(np.arange(rows), data.RowRandom(0, 0, range(rows)))
    cfg = Config(**{**PRESETS["tiny"], "vocab_size": len(vocab), "feat_dim": images.feature_dim,
                    "num_labels": len(images.class_names), "num_attrs": len(images.attr_names), "dropout": 0.0})
    torch.manual_seed(0)
    return batch, VisualBERT(cfg)


def gradient(start, micro, loss_of=None):
    """The gradient of one step from the model `start`, read off a step of SGD at lr 1 without clip:
    each objective's sum over its count in all the micro-batches (what pretrain.py's loop divides by),
    or loss_of(model, micro-batch)."""
    model = VisualBERT(start.cfg)
    model.load_state_dict(start.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    micro = [with_positions(mb) for mb in micro]
    if loss_of is None:
        counts = sum(torch.stack(list(model.count_targets(mb).values())) for mb in micro).clamp(min=1)
        loss_of = lambda m, mb: (m.pretrain_loss(mb)[0] / counts).sum()  # noqa: E731
    for mb in micro:
        scaler.scale(loss_of(model, mb)).backward()
    common.clip_and_step(opt, scaler, 1e9)
    return {k: start.state_dict()[k] - v for k, v in model.state_dict().items()}


def assert_same(a, b, rel):
    """Each tensor of a equal to b's within rel of its largest entry (some are 1e4; 0.1 at least: some are 0)."""
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=rel * max(b[k].abs().max().item(), 0.1), msg=k)


def test_micro_batches_take_the_step_of_the_whole_batch(toy):
    batch, model = toy_batch(toy)
    whole = gradient(model, [batch])
    counts = [int((common.shard(batch, j, 4)["mlm_labels"] != -100).sum()) for j in range(4)]
    assert len(set(counts)) > 1, counts  # the micro-batches hold different numbers of masked tokens
    for n in (2, 4):
        assert_same(gradient(model, [common.shard(batch, j, n) for j in range(n)]), whole, 1e-5)
    # the mean of each micro-batch's own means is another gradient: the test above would see it
    naive = gradient(model, [common.shard(batch, j, 4) for j in range(4)],
                     lambda m, mb: pretrain_losses(m, mb)[0] / 4)
    with pytest.raises(AssertionError):
        assert_same(naive, whole, 1e-3)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grad_accum_end_to_end_pretrain(toy, tmp_path, monkeypatch):
    flops = {}
    real = pretrain.train_flops

    def spy(cfg, B, T, predicted=0):  # what the status line's samples/s, tokens/s and MFU count
        flops.setdefault(spy.run, []).append((B, T, predicted))
        return real(cfg, B, T, predicted)

    monkeypatch.setattr(pretrain, "train_flops", spy)
    for n in (1, 4):
        spy.run = n
        pretrain.main(["--aligned", "--toy-root", toy, "--out", str(tmp_path / str(n)), "--cache-dir", os.path.join(toy, "cache"),
                       "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--eval-batches", "1", "--dropout", "0",
                       "--grad-accum", str(n)])
    one, four = read_log(tmp_path / "1"), read_log(tmp_path / "4")
    assert len(one) == 3 and {r["modality"].split(":")[0] for r in one} == {"text", "pairs"}
    for a, b in zip(one, four):
        assert a.keys() == b.keys() and a["modality"] == b["modality"]
        for k in a:
            if k != "modality":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    ckpts = [torch.load(tmp_path / n / "ckpt.pt", weights_only=False)["model"] for n in ("1", "4")]
    for k in ckpts[0]:
        torch.testing.assert_close(ckpts[1][k], ckpts[0][k], atol=1e-5, rtol=0, msg=k)
    assert flops[4] == flops[1] and all(B == 8 for B, _, _ in flops[4])  # the whole batch of each step, counted once
    with pytest.raises(SystemExit, match=r"--batch-size 8 is the global batch: it must split into 1 process\(es\) x --grad-accum 3"):
        pretrain.main(["--aligned", "--toy-root", toy, "--out", str(tmp_path / "3"), "--batch-size", "8", "--grad-accum", "3"])


def test_grad_accum_end_to_end_finetune(toy, tmp_path):
    common = ["--task", "vqa", "--toy-root", toy, "--batch-size", "8", "--epochs", "0.5", "--log-every", "1", "--dropout", "0",
              "--min-answer-count", "1"]
    for n in (1, 4):
        finetune.main(common + ["--out", str(tmp_path / str(n)), "--grad-accum", str(n)])
    one, four = [[r for r in read_log(tmp_path / n) if "step" in r] for n in ("1", "4")]
    assert len(one) == len(four) >= 2
    for a, b in zip(one, four):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    ckpts = [torch.load(tmp_path / n / "ckpt.pt", weights_only=False) for n in ("1", "4")]
    for part in ("model", "head"):
        for k in ckpts[0][part]:
            torch.testing.assert_close(ckpts[1][part][k], ckpts[0][part][k], atol=1e-5, rtol=0, msg=k)


# -----------------------------------------------------------------------------
# no host-device synchronisation on a step that does not log or save. On a CPU nothing waits, so
# what is counted is every call that on a GPU makes the host wait for the device: reading a value
# (item, float, bool, tolist, cpu) and the operations whose output size depends on the data
# (nonzero, masked_select, indexing by a boolean mask).

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = args[1] if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) else []
        if func in SYNCING or any(t is not None and t.dtype == torch.bool for t in indices):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_syncs(monkeypatch):
    """count_syncs(module, name): every call of module.name runs under Syncs; returns the list of
    each call's syncing calls."""
    active = []
    for method in ("tolist", "cpu"):  # these read without dispatching an operation on a CPU (numpy() refuses a GPU's tensor)
        real_method = getattr(torch.Tensor, method)

        def reading(self, *a, _real=real_method, _name=method, **k):
            if active:
                active[-1].calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, reading)

    def arm(module, name):
        real, per_call = getattr(module, name), []

        def counted(*a, **k):
            with Syncs() as s:
                active.append(s)
                try:
                    return real(*a, **k)
                finally:
                    active.pop()
                    per_call.append(s.calls)

        monkeypatch.setattr(module, name, counted)
        return per_call

    def arm_steps():
        """pretrain.py's loop writes its step out: count from its micro-batches' arrival on the device
        (common.micro_batches) to the end of its optimiser step (common.clip_and_step)."""
        real_micro, real_step, per_step, open_step = common.micro_batches, common.clip_and_step, [], []

        def micro_batches(*a, **k):
            out = real_micro(*a, **k)
            open_step.append(Syncs().__enter__())
            active.append(open_step[-1])
            return out

        def clip_and_step(*a, **k):
            try:
                return real_step(*a, **k)
            finally:
                if open_step:  # a step of pretrain.py's loop (finetune.py's are counted by arm)
                    s = open_step.pop()
                    active.remove(s)
                    s.__exit__(None, None, None)
                    per_step.append(s.calls)

        monkeypatch.setattr(common, "micro_batches", micro_batches)
        monkeypatch.setattr(common, "clip_and_step", clip_and_step)
        return per_step

    arm.steps = arm_steps
    return arm


def test_the_counter_sees_what_synchronises(toy, count_syncs):
    batch, model = toy_batch(toy, rows=4)
    with Syncs() as s:
        x = torch.arange(6.0)
        x[x > 2], float(x.sum()), x.nonzero()
        model.pretrain_loss(batch)  # the positions of the masked tokens and regions found from boolean masks
    assert "aten.index.Tensor" in s.calls and "aten._local_scalar_dense.default" in s.calls and s.calls.count("aten.nonzero.default") >= 4
    batch = with_positions(batch)  # found by the host
    with Syncs() as s:
        model.pretrain_loss(batch)
    assert s.calls == []


def test_no_host_sync_on_a_step_that_does_not_log_or_save(toy, tmp_path, count_syncs, monkeypatch):
    per_step = count_syncs.steps()
    reads = []
    real_read = common.read_losses
    monkeypatch.setattr(common, "read_losses", lambda pending, *a: reads.append(pending[-1][0]) or real_read(pending, *a))
    pretrain.main(["--hybrid", "--toy-root", toy, "--out", str(tmp_path / "pre"), "--cache-dir", os.path.join(toy, "cache"),
                   "--max-steps", "8", "--batch-size", "8", "--log-every", "4", "--save-every", "100", "--eval-batches", "1",
                   "--grad-accum", "2"])
    assert len(per_step) == 8 and per_step == [[]] * 8  # forward, backward, counts, clip and AdamW: never a read
    assert reads == [4, 8]  # the host reads the losses (and checks them) on the logging steps alone

    per_step, reads = count_syncs(common, "train_step"), []
    finetune.main(["--task", "retrieval", "--toy-root", toy, "--out", str(tmp_path / "ft"), "--batch-size", "8", "--epochs", "0.5",
                   "--log-every", "4", "--save-every", "100"])
    assert len(per_step) == 9 and per_step == [[]] * 9
    assert reads == [4, 8, 9]  # logging steps and the last


# -----------------------------------------------------------------------------
# fp16 (a V100's, a T4's): the loss scale holds and the run tracks fp32's. A masked region's features are
# zeroed, so LN_feat's input there is W_feat's bias alone (zero at the start): LN's backward multiplies the
# gradient by 1/sqrt(var + eps), up to 1e6, and W_feat's backward overflowed float16 on every image step.


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
    batch, model = toy_batch(toy, "image")
    batch = with_positions(batch)
    zeroed = (batch["region_masked"] & (batch["feats"].abs().sum(-1) == 0)).sum()
    assert zeroed > 0  # masked regions with zeroed features: LN_feat sees its bias alone
    want = gradients(model, batch, "fp32")
    assert want["embeddings.feat.0.bias"].abs().max() > 100  # the gradient the singular LN sends back, in fp32
    got = gradients(model, batch, "fp16")
    bad = [n for n, g in got.items() if not torch.isfinite(g).all()]
    assert not bad, bad  # the unmended code: embeddings.feat.0.weight and .bias non-finite
    for n in ("embeddings.feat.0.weight", "embeddings.feat.0.bias", "embeddings.box.0.weight", "layers.0.ffn_in.weight"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0.05 * want[n].abs().max().item(), msg=n)


def test_fp16_pretrain_keeps_its_loss_scale_and_tracks_fp32(toy, tmp_path):
    def run(dtype):
        out = tmp_path / dtype
        pretrain.main(["--unaligned", "--toy-root", toy, "--out", str(out), "--cache-dir", os.path.join(toy, "cache"),
                       "--batch-size", "8", "--max-steps", "12", "--log-every", "1", "--eval-batches", "1",
                       "--dtype", dtype])
        return read_log(out), torch.load(out / "ckpt.pt", weights_only=False)["scaler"]

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
