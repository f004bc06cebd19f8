"""Data: the feature store, tokenised corpora, masking statistics (docs/METHOD.md §2), the sampler (docs/METHOD.md §4)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import data  # noqa: E402
import storage  # noqa: E402
import toy  # noqa: E402
from toy import CLASSES, ToyWorld, draw_scene, make_toy_world  # noqa: E402
from data import Vocab  # noqa: E402
from storage import FeatureStore, FeatureWriter  # noqa: E402

WORDS = ["the", "a", "red", "car", "dog", "big", "truck", "sat", "on", "mat", "fire", "hot"]
VOCAB = Vocab(list(Vocab.RESERVED) + WORDS + ["##s", "##ing", "##er"] + [f"w{i}" for i in range(40)])


def write_store(path, n=7, K=3, D=8, shard_size=3, attrs=True, seed=0):
    r = np.random.default_rng(seed)
    w = FeatureWriter(path, D, ["car", "dog", "man,men"], attr_names=["red", "blue"] if attrs else None,
                      extractor={"test": True}, shard_size=shard_size)
    truth = {}
    for i in range(n):
        k = K + i % 2
        e = dict(features=r.standard_normal((k, D)).astype(np.float32), boxes=r.random((k, 4)).astype(np.float32),
                 labels=r.integers(0, 3, k), scores=r.random(k).astype(np.float32), width=100 + i, height=50 + i)
        if attrs:
            e.update(attributes=r.integers(0, 2, k), attr_scores=r.random(k).astype(np.float32))
        w.add(f"img{i}", **e)
        truth[f"img{i}"] = e
    w.close()
    return truth


def test_feature_store_round_trip(tmp_path):
    truth = write_store(str(tmp_path))
    store = FeatureStore(str(tmp_path))
    assert len(store) == 7 and store.ids() == [f"img{i}" for i in range(7)]
    assert store.class_names == ["car", "dog", "man,men"] and store.meta["extractor"] == {"test": True}
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".index.json")]) == 3  # 3 + 3 + 1 images
    for i, e in truth.items():
        got = store[i]
        np.testing.assert_array_equal(got["features"], e["features"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got["boxes"], e["boxes"])
        np.testing.assert_array_equal(got["labels"], e["labels"])
        np.testing.assert_array_equal(got["scores"], e["scores"])
        np.testing.assert_array_equal(got["attributes"], e["attributes"])
        assert (got["width"], got["height"]) == (e["width"], e["height"])
    with pytest.raises(KeyError, match="no features for image 'nope'"):
        store["nope"]


def test_feature_store_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(str(tmp_path / "missing"))
    write_store(str(tmp_path))
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".features.npy"))[1]
    with open(tmp_path / shard, "r+b") as f:  # truncate one shard
        f.truncate(200)
    with pytest.raises(ValueError, match="truncated|shape"):
        FeatureStore(str(tmp_path))
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match="missing"):
        FeatureStore(str(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        FeatureWriter(str(tmp_path), 8, ["car", "dog", "man,men"], extractor={"test": False})


def test_tokenised_corpus(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("\nthe red car sat .\nthe dog sat on the mat\n\n\na big truck\n\nthe fire truck\nhot dogs\n")
    c = storage.TokenCorpus(str(f), VOCAB, "docs", str(tmp_path / "cache"))
    assert len(c) == 5 and c.docs.tolist() == [0, 0, 1, 2, 2]
    assert VOCAB.decode(c[2]) == "a big truck"
    assert c.chunks(100).tolist() == [[0, 2], [2, 3], [3, 5]]  # chunks never cross documents
    assert c.chunks(6).tolist() == [[0, 1], [1, 2], [2, 3], [3, 5]]
    again = storage.TokenCorpus(str(f), VOCAB, "docs", str(tmp_path / "cache"))  # cached
    assert np.array_equal(again.tokens, c.tokens)
    # bad lines are skipped and listed; a file with nothing usable is fatal, with file and line
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nnot \xff fine\n" + b"x" * 100_001 + b"\nthe end\n")
    c = storage.TokenCorpus(str(bad), VOCAB, "lines", str(tmp_path / "cache"))
    assert len(c) == 3 and [n for n, _ in c.skipped] == [3, 4]
    assert "bad.txt: skipped 2 bad line(s) (line 3: not valid UTF-8 (byte 0xff at column 5); line 4: 100001 characters long" in c.report()
    again = storage.TokenCorpus(str(bad), VOCAB, "lines", str(tmp_path / "cache"))  # the cache remembers what was skipped
    assert again.skipped == c.skipped
    worse = tmp_path / "worse.txt"
    worse.write_bytes(b"\xc3\x28\n\n")
    with pytest.raises(ValueError, match=r"worse.txt: no usable line \(1 bad, the first: line 1, not valid UTF-8"):
        storage.TokenCorpus(str(worse), VOCAB, "lines", str(tmp_path / "cache"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        storage.TokenCorpus(str(empty), VOCAB, "lines", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image_id": 7, "caption": "a red car"}\n{"image": 8}\nnot json\n')
    c = storage.TokenCorpus(str(pairs), VOCAB, "pairs", str(tmp_path / "cache"))
    assert c.image_ids == ["7"] and [n for n, _ in c.skipped] == [2, 3]


def test_text_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(VOCAB), (400, 60), generator=gen)
    ids[:, 0], ids[:, -1], ids[:10, 30:] = VOCAB.cls, VOCAB.sep, VOCAB.pad
    inputs, labels = data.mask_text(ids, VOCAB, data.RowRandom(0, 0, range(400)))
    maskable = ~torch.from_numpy(VOCAB.special)[ids]
    picked = labels != -100
    assert not (picked & ~maskable).any()  # never [CLS], [SEP], padding
    assert torch.equal(labels[picked], ids[picked])
    rate = picked.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.01, rate
    as_mask = (inputs[picked] == VOCAB.mask).float().mean()
    kept = (inputs[picked] == ids[picked]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / len(VOCAB)) < 0.02, (as_mask, kept)
    assert torch.equal(inputs[~picked], ids[~picked])


def test_whole_word_masking_takes_all_pieces_of_a_word():
    rng = data.RowRandom(1, 0, range(300))
    cont = VOCAB.tokens.index("##s")
    row = [VOCAB.cls] + [VOCAB.tokens.index("dog"), cont, cont, VOCAB.tokens.index("car")] * 10 + [VOCAB.sep]
    ids = torch.tensor([row] * 300)
    _, labels = data.mask_text(ids, VOCAB, rng, whole_word=True)
    picked = labels != -100
    words = picked[:, 1:-1].view(300, 10, 4)
    assert torch.equal(words[..., 0], words[..., 1]) and torch.equal(words[..., 0], words[..., 2])  # "dog ##s ##s" together
    rate = words[..., [0, 3]].float().mean()  # words are chosen with p 0.15
    assert abs(rate - 0.15) < 0.015, rate
    _, piecewise = data.mask_text(ids, VOCAB, rng)
    pw = (piecewise != -100)[:, 1:-1].view(300, 10, 4)
    assert not torch.equal(pw[..., 0], pw[..., 1])  # piece by piece they come apart


def test_region_and_tag_masking_statistics():
    gen, rng = torch.Generator().manual_seed(2), data.RowRandom(2, 0, range(300))
    B, K, D = 300, 20, 4
    feats = (torch.arange(B)[:, None, None] * 1000 + torch.arange(K)[None, :, None] + 1).float().expand(B, K, D).clone()
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[::3, 15:] = False
    out, masked = data.mask_regions(feats, valid, rng)
    assert not (masked & ~valid).any()
    assert abs(masked.sum() / valid.sum() - 0.15) < 0.01
    zero = (out == 0).all(-1)
    same = (out == feats).all(-1)
    replaced = masked & ~zero & ~same
    n = masked.sum()
    assert abs(zero[masked].sum() / n - 0.8) < 0.03 and abs(replaced.sum() / n - 0.1) < 0.02 and abs(same[masked].sum() / n - 0.1) < 0.02
    assert torch.equal(out[~masked], feats[~masked])
    src_image = (out[replaced][:, 0] // 1000).long()
    src_region = (out[replaced][:, 0] % 1000).long() - 1
    assert (src_image != replaced.nonzero()[:, 0]).all()  # replacements come from another image of the batch
    assert valid[src_image, src_region].all()  # and from a real (not padded) region of it

    # tags: masked with p 0.15, and with p 0.9 more when their region is masked: 1 - 0.85 * 0.1 = 0.915
    tag_region = torch.arange(K).repeat_interleave(2).expand(B, 2 * K)  # two pieces per tag
    tag_ids = torch.randint(5, len(VOCAB), (B, 2 * K), generator=gen)
    _, labels = data.mask_tags(tag_ids, tag_region, masked, VOCAB, rng)
    tag_masked = (labels != -100)[:, ::2]
    assert torch.equal(tag_masked, (labels != -100)[:, 1::2])  # a tag's pieces go together
    assert abs(tag_masked[masked].float().mean() - 0.915) < 0.03
    assert abs(tag_masked[~masked].float().mean() - 0.15) < 0.01


def test_sampler_proportions_and_coverage():
    sizes, bs = [10000, 5000, 2500], 10
    plan = data.epoch_plan(sizes, [1, 1, 1], bs, seed=0, epoch=0)
    sets = np.array([d for d, _ in plan])
    assert np.bincount(sets).tolist() == [1000, 500, 250]  # every full batch, once
    for d, n in enumerate(sizes):  # every item of every set, once
        seen = np.concatenate([idx for s, idx in plan if s == d])
        assert sorted(seen) == list(range(n))
    # proportional draws: any stretch of the epoch holds the sets about 4:2:1
    for part in np.array_split(sets, 5):
        frac = np.bincount(part, minlength=3) / len(part)
        assert np.all(np.abs(frac - np.array([4, 2, 1]) / 7) < 0.08), frac
    assert sets[:20].tolist() != sorted(sets[:20].tolist())  # interleaved, not one set after another
    # a rate of 0.5 takes half of a set per epoch, and two epochs cover all of it
    e0 = data.epoch_plan([100], [0.5], 10, seed=0, epoch=0)
    e1 = data.epoch_plan([100], [0.5], 10, seed=0, epoch=1)
    assert len(e0) == 5 and sorted(np.concatenate([i for _, i in e0 + e1])) == list(range(100))
    assert data.epoch_plan(sizes, [1] * 3, bs, 0, 0)[3][1].tolist() == plan[3][1].tolist()  # deterministic
    assert data.epoch_plan(sizes, [1] * 3, bs, 0, 1)[3][1].tolist() != plan[3][1].tolist()  # reshuffled per epoch


def test_image_inputs_tags_carry_their_region_box(tmp_path):
    write_store(str(tmp_path), attrs=True)
    store = FeatureStore(str(tmp_path))
    pieces = [[VOCAB.tokens.index("car")], [VOCAB.tokens.index("dog"), VOCAB.tokens.index("##s")], [VOCAB.tokens.index("big")]]
    entries = [store["img0"], store["img1"]]
    b = data.image_inputs(entries, pieces)
    assert b["feats"].shape == (2, 4, 8) and b["region_mask"].sum().item() == 7
    for i, e in enumerate(entries):
        expect = [p for lab in e["labels"] for p in pieces[lab]]
        L = len(expect)
        assert b["tag_ids"][i, :L].tolist() == expect and b["tag_mask"][i].sum() == L
        for j in range(L):  # each piece carries the box of the region it names
            k = b["tag_region"][i, j]
            assert torch.equal(b["tag_boxes"][i, j], torch.from_numpy(e["boxes"][k]))
    capped = data.image_inputs(entries, pieces, max_tags=2)
    assert capped["tag_mask"].sum(1).max() <= 2
    assert not any(k.startswith("tag") for k in data.image_inputs(entries, pieces, tags=False))


def pair_corpus(path, image_of_pair):
    """Aligned pairs over a store whose image k has every feature equal to k + 1, so that the image a
    batch row shows can be read back from its feature targets."""
    ids = sorted(set(image_of_pair))
    w = FeatureWriter(path, 4, ["car", "dog", "man,men"])
    for k, i in enumerate(ids):
        w.add(i, np.full((2, 4), k + 1, np.float32), np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32),
              np.array([0, 1]), np.array([0.9, 0.8], np.float32), 10, 10)
    w.close()
    captions = [np.array([VOCAB.tokens.index(t) for t in "the big red dog sat on the mat".split()])] * len(image_of_pair)
    return data.Corpus("pairs", "pair", VOCAB, (captions, list(image_of_pair)), data.Images([path])), ids


def test_a_swapped_image_is_another_image_and_its_caption_is_still_masked(tmp_path):
    image_of_pair = [f"im{k // 5}" for k in range(15)]  # five captions of each of three images, as COCO has
    corpus, ids = pair_corpus(str(tmp_path / "a"), image_of_pair)
    rows = []
    for seed in range(20):
        b = corpus.batch(np.arange(15), data.RowRandom(seed, 0, range(15)))
        shown = [ids[int(k) - 1] for k in b["feat_targets"][:, 0, 0]]  # (15,) the image each row shows
        for j in range(15):
            rows.append((int(b["match_labels"][j]), shown[j] != image_of_pair[j], int((b["mlm_labels"][j] != -100).sum())))
    swapped = [r for r in rows if r[0] == 1]
    assert 0.4 < len(swapped) / len(rows) < 0.6  # label 1 with p 0.5
    assert all(other == bool(label) for label, other, _ in rows)  # label 1 exactly when the image is another one
    # the caption is masked and predicted whether or not the pair matches, at the same rate
    masked = lambda label: np.mean([n for lab, _, n in rows if lab == label])  # noqa: E731
    assert masked(1) > 0.5 and masked(0) > 0.5 and abs(masked(1) - masked(0)) < 0.5, (masked(1), masked(0))
    # a set of pairs that all show one image has no other image: every pair stays matched
    one, _ = pair_corpus(str(tmp_path / "b"), ["im0"] * 6)
    b = one.batch(np.arange(6), data.RowRandom(0, 0, range(6)))
    assert b["match_labels"].tolist() == [0] * 6 and (b["mlm_labels"] != -100).any()


def test_nsp_layout():
    a, b = [VOCAB.tokens.index("red"), VOCAB.tokens.index("car")], [VOCAB.tokens.index("dog")]
    x = data.text_inputs([a], VOCAB, 64, second=[b])
    assert x["input_ids"][0].tolist() == [VOCAB.cls, *a, VOCAB.sep, *b, VOCAB.sep]
    assert x["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1]
    long = data.text_inputs([list(range(5, 100))], VOCAB, 30)
    assert long["input_ids"].shape == (1, 30) and long["input_ids"][0, -1] == VOCAB.sep


def test_toy_world_is_deterministic_and_complete(tmp_path):
    a, b = make_toy_world(str(tmp_path / "a"), seed=3, scale=0.01), make_toy_world(str(tmp_path / "b"), seed=3, scale=0.01)
    for rel in ["vocab.txt", "pretrain/captions.txt", "pretrain/text.txt", "tasks/nlvr2/dev.json",
                "tasks/vqa/v2_mscoco_val2014_annotations.json", "tasks/flickr30k/dataset_flickr30k.json",
                "tasks/refcoco+/instances.json", "tasks/refcoco+/refs(unc).p"]:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read(), rel
    sa, sb = FeatureStore(os.path.join(a, "features", "pretrain")), FeatureStore(os.path.join(b, "features", "pretrain"))
    i = sa.ids()[0]
    np.testing.assert_array_equal(sa[i]["features"], sb[i]["features"])
    assert set(sa[i]) >= {"features", "boxes", "labels", "scores", "width", "height", "attributes"}
    assert ((sa[i]["boxes"] >= 0) & (sa[i]["boxes"] <= 1)).all()
    assert sa.class_names == CLASSES
    png = draw_scene(a, i, str(tmp_path / "scene.png"))
    from PIL import Image
    assert Image.open(png).size == (640, 520)


def test_a_drawn_scene_is_the_same_in_every_process(tmp_path):
    """toy.py --show draws the same caption whatever Python's per-process string hash seed is."""
    root = make_toy_world(str(tmp_path / "w"), seed=3, scale=0.01)
    script = f"import toy; toy.draw_scene({root!r}, 'pt000001', {str(tmp_path)!r} + '/' + __import__('os').environ['PYTHONHASHSEED'] + '.png')"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ["1", "2"]:
        subprocess.run([sys.executable, "-c", script], cwd=here, check=True, env={**os.environ, "PYTHONHASHSEED": seed})
    assert open(tmp_path / "1.png", "rb").read() == open(tmp_path / "2.png", "rb").read()


def test_the_toy_world_is_the_same_in_every_process(tmp_path):
    """The toy world's text and answers do not depend on Python's per-process string hash seed (a
    set's order did pick the class of "two dogs and ..." captions and the VQA answer of a tie)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ["1", "2"]:
        script = f"import toy; toy.make_toy_world({str(tmp_path / seed)!r}, seed=3, scale=0.05)"
        subprocess.run([sys.executable, "-c", script], cwd=here, check=True, env={**os.environ, "PYTHONHASHSEED": seed},
                       stdout=subprocess.DEVNULL)
    # vocab.txt too: trained in each process, it differed (the trainer's ties fall in hash-map order)
    for rel in ["vocab.txt", "pretrain/captions.txt", "pretrain/pairs.jsonl", "heldout/pairs.jsonl",
                "tasks/flickr30k/dataset_flickr30k.json", "tasks/vqa/v2_mscoco_train2014_annotations.json"]:
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "2" / rel).read_bytes(), rel


def test_train_vocab_covers_the_toy_words(tmp_path):
    """toy.py --train-vocab: WordPiece pieces of a world's words, the reserved tokens first; every class,
    colour and size word is split into known pieces, never [UNK]."""
    root = make_toy_world(str(tmp_path / "w"), seed=3, scale=0.02, log=lambda *a: None)
    out = toy.train_vocab(root, str(tmp_path / "vocab.txt"))
    vocab = Vocab.from_file(out)
    assert open(out).read().split("\n")[:len(Vocab.RESERVED)] == list(Vocab.RESERVED)
    assert open(os.path.join(root, "vocab.txt")).read() == open(out).read()
    for word in CLASSES + toy.COLORS + toy.SIZES:
        assert Vocab.RESERVED[1] not in vocab.tokenizer.encode(word, add_special_tokens=False).tokens, word


def test_toy_detector_features_follow_classes_and_groups():
    """Related classes get related features: same class closest, then same group, then others."""
    world = ToyWorld(0)
    feats = {c: np.mean([world.detect(world.scene(classes=[c, c]))["features"][0] for _ in range(30)], 0) for c in ["car", "truck", "dog"]}
    d = lambda a, b: np.linalg.norm(feats[a] - feats[b])
    assert d("car", "truck") < d("car", "dog") and d("car", "truck") < d("truck", "dog")


@pytest.mark.parametrize("slot_bytes", [data.SLOT_BYTES, 1024])  # 1024: caption batches fit a slot, image batches do not
def test_batches_through_workers_are_the_batches_built_here(tmp_path, monkeypatch, slot_bytes):
    """data.batches with worker processes (each batch packed into a shared ring of buffers) gives
    exactly dataset[step], step after step, for batches of every kind and size; each stays valid."""
    monkeypatch.setattr(data, "SLOT_BYTES", slot_bytes)
    write_store(str(tmp_path / "store"), n=9, K=3, D=8)
    images = data.Images([str(tmp_path / "store")])
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[j % 12] for j in range(i, i + 3 + i % 5)) for i in range(30)) + "\n")
    lines = storage.TokenCorpus(str(text), VOCAB, "lines", str(tmp_path / "cache"))
    corpora = [data.Corpus("images", "image", VOCAB, sorted(images.where), images),
               data.Corpus("captions", "caption", VOCAB, lines)]
    ds = data.PretrainData(corpora, 4, seed=1)
    steps = range(3, 3 + 2 * ds.steps_per_epoch)
    want = [ds[s] for s in steps]
    for workers in (0, 2):
        got = list(data.batches(ds, steps, workers))  # all held at once: a later batch must not overwrite an earlier one
        assert [n for n, _ in got] == [n for n, _ in want]
        assert {n for n, _ in got} == {"images", "captions"}
        for (_, a), (_, b) in zip(got, want):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_bench_reports_the_loader_and_what_an_h100_consumes(capsys):
    bench.main(["--device", "cpu", "--model", "tiny", "--steps", "0", "--batch-size", "4", "--regions", "5", "--feat-dim", "16", "--loader-images", "12",
                "--workers", "1"])
    out = capsys.readouterr().out
    assert "loader: " in out and " samples/s from a feature store (1 workers, 5 x 16 features)" in out
    assert "an H100 at 45% MFU consumes about" in out and "tokens/s" not in out  # --steps 0: the loader alone


def test_each_process_builds_its_rows_of_the_global_batch(tmp_path):
    """PretrainData for rank r of 3 builds rows 16 r to 16 r + 15 of the global batch of 48, each row as
    one process building all 48 has it (up to the padded width): a row depends on (seed, step, row)
    alone, whatever the other rows built with it. Every kind of data set; a pair's image and a
    replaced region may come from another process's rows."""
    toy = make_toy_world(str(tmp_path / "toy"), seed=0, scale=0.03, log=lambda *a: None)
    vocab = Vocab.from_file(os.path.join(toy, "vocab.txt"))
    images = data.Images([os.path.join(toy, "features", "pretrain")])
    tok = lambda f, kind: storage.TokenCorpus(os.path.join(toy, "pretrain", f), vocab, kind, str(tmp_path / "cache"))  # noqa: E731
    pairs = tok("pairs.jsonl", "pairs")
    corpora = [data.Corpus("images", "image", vocab, sorted(images.where), images), data.Corpus("captions", "caption", vocab, tok("captions.txt", "lines")),
               data.Corpus("text", "text", vocab, tok("text.txt", "docs"), nsp=True), data.Corpus("pairs", "pair", vocab, (pairs, pairs.image_ids), images)]
    whole = data.PretrainData(corpora, 48, seed=5)
    shares = [data.PretrainData(corpora, 48, seed=5, rank=r, world=3) for r in range(3)]
    seen = set()
    for step in range(40):
        name, full = whole[step]
        seen.add(name)
        for r, share in enumerate(shares):
            got_name, part = share[step]
            assert got_name == name and part.keys() == full.keys()
            for k, v in part.items():
                rows = full[k][16 * r:16 * r + len(v)]
                assert len(v) == 16 and torch.equal(v, rows[(slice(None),) + tuple(slice(0, n) for n in v.shape[1:])]), (step, name, k)
        if name == "images":  # some regions were replaced by another row's region
            replaced = full["region_masked"] & (full["feats"] != full["feat_targets"]).any(-1) & (full["feats"] != 0).any(-1)
            assert replaced.any()
    assert seen == {"images", "captions", "text", "pairs"}
