"""
Data for U-VisualBERT's pre-training (docs/METHOD.md §2, 4), in the order it flows: the vocabulary,
masking, one item and a batch of a corpus, the proportional sampler, the loader. The files it reads
(feature stores, tokenised text) are storage.py's; the toy world that fills them with no download is toy.py.

Sections, in order:
  1. text: a WordPiece vocabulary
  2. masking (docs/METHOD.md §2)
  3. batches of each corpus, the proportional sampler (docs/METHOD.md §4), the loader
  4. for a GPU: batches handed over by worker processes, and the positions found on the host (a
     student on a CPU may skip it)
"""

import mmap
import os

import numpy as np
import torch

import storage
from model import MASK_PROB

# -----------------------------------------------------------------------------
# 1. text


class Vocab:
    """BERT's WordPiece vocabulary (uncased), through the `tokenizers` package."""

    RESERVED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, tokens, source="vocab"):
        from tokenizers import BertWordPieceTokenizer
        self.tokens = list(tokens)
        index = {t: i for i, t in enumerate(self.tokens)}
        missing = [s for s in self.RESERVED if s not in index]
        if missing:
            raise ValueError(f"{source}: no {', '.join(missing)} in the vocabulary")
        self.pad, self.unk, self.cls, self.sep, self.mask = (index[s] for s in self.RESERVED)
        self.tokenizer = BertWordPieceTokenizer(vocab=index, lowercase=True)
        # a piece that continues a word ("##ing"): whole-word masking keeps it with the word before
        self.continuation = np.array([t.startswith("##") for t in self.tokens])
        self.special = np.array([t in self.RESERVED for t in self.tokens])

    @classmethod
    def from_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                tokens = [line.rstrip("\n") for line in f]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a vocabulary (one word piece a line, UTF-8)") from None
        while tokens and tokens[-1] == "":
            tokens.pop()
        return cls(tokens, source=path)

    def __len__(self):
        return len(self.tokens)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids))

    def tag_pieces(self, class_names):
        """The word pieces of each detector class's name (its first synonym: "man,men" -> "man")."""
        return [self.encode(name.split(",")[0].strip()) or [self.unk] for name in class_names]


# -----------------------------------------------------------------------------
# 2. masking (docs/METHOD.md §2)

TAG_JOINT_PROB = 0.9  # a tag whose region is masked is masked too, with this probability


class RowRandom:
    """Uniform random numbers for some rows of a batch. Number t of draw d of row i is a hash of
    (seed, step, i, d, t) alone (SplitMix64's mixing), so what row i gets does not depend on the
    other rows built with it nor on the padded width: a process that builds only its rows of the
    global batch gets what one process building all of them gets for those rows."""

    def __init__(self, seed, step, rows, size=None):
        self.rows = np.asarray(rows, dtype=np.int64)  # the rows built, numbered in the whole batch
        self.size = len(self.rows) if size is None else size  # rows in the whole batch
        self.key = _mix(_mix(np.uint64(seed % 2**64)) ^ np.uint64(step % 2**64))
        self.draws = 0

    def uniform(self, n):
        """(rows, n) float64 in [0, 1), new numbers at each call."""
        self.draws += 1
        row = _mix(self.key ^ _mix(self.rows.astype(np.uint64) * GOLDEN + np.uint64(self.draws)))  # (rows,)
        x = _mix(row[:, None] + np.arange(n, dtype=np.uint64) * GOLDEN)  # (rows, n)
        return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / 2.0**53)


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    """SplitMix64's finaliser (uint64 arithmetic wraps around)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mask_units(ids, units, chosen, vocab, rng):
    """Mask whole units (a piece, a word, a tag) together: each chosen unit's pieces all become
    [MASK] (80%), all become random pieces (10%) or all stay (10%).

    ids (B, T) pieces; units (B, T) the unit of each piece, -1 for pieces never masked ([CLS],
    [SEP], padding); chosen (B, U) which units are masked. Returns (inputs, labels), labels -100
    where nothing is predicted."""
    action = rng.uniform(chosen.shape[1])  # (B, U)
    pieces = (rng.uniform(ids.shape[1]) * len(vocab)).long()  # (B, T) a random piece for each position
    u = units.clamp(min=0)
    picked = chosen.gather(1, u) & (units >= 0)  # (B, T)
    act = action.gather(1, u)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    inputs = torch.where(picked & (act < 0.8), vocab.mask, ids)
    rand = picked & (act >= 0.8) & (act < 0.9)
    return torch.where(rand, pieces, inputs), labels


def mask_text(ids, vocab, rng, whole_word=False):
    """Masked LM inputs for padded text (B, T): piece by piece (captions) or by whole words
    (general text: a word's "##" pieces go with it)."""
    maskable = torch.from_numpy(~vocab.special)[ids]  # (B, T)
    if whole_word:
        starts = ~torch.from_numpy(vocab.continuation)[ids] | ~maskable
        units = starts.long().cumsum(1) - 1  # (B, T) word index
    else:
        units = torch.arange(ids.shape[1]).expand_as(ids)
    units = torch.where(maskable, units, torch.full_like(units, -1))
    chosen = rng.uniform(ids.shape[1]) < MASK_PROB  # (B, U), U = T bounds the unit count
    return mask_units(ids, units, chosen, vocab, rng)


def mask_regions(feats, valid, rng, donor=None):
    """Region masking: each region with p 0.15; of those 80% zeroed, 10% replaced by a region of
    another row's image, 10% kept. The box is never masked. feats (B, K, D), valid (B, K), valid
    regions first. donor(j, u) -> (N, D) region features: for each row j of the whole batch, its
    image's region at fraction u of its regions (default: the rows of `feats`, then the whole
    batch). Returns the new features and which regions were masked. A batch of one row has no
    other image, and regions drawn for replacement stay as they are."""
    B, K, _ = feats.shape
    masked = (rng.uniform(K) < MASK_PROB) & valid
    action, other, which = rng.uniform(K), rng.uniform(K), rng.uniform(K)
    out = feats.clone()
    out[(masked & (action < 0.8)).nonzero(as_tuple=True)] = 0  # by row index: a (B, K) boolean mask is slow on float16
    i, k = (masked & (action >= 0.8) & (action < 0.9)).nonzero(as_tuple=True)
    if rng.size > 1 and len(i):
        if donor is None:
            n = valid.sum(1)
            donor = lambda j, u: feats[j, (u * n[j]).long()]  # noqa: E731
        j = (torch.from_numpy(rng.rows)[i] + 1 + (other[i, k] * (rng.size - 1)).long()) % rng.size  # never the same row
        out[i, k] = donor(j, which[i, k]).to(out.dtype)
    return out, masked


def mask_tags(tag_ids, tag_region, region_masked, vocab, rng):
    """Tag masking: a tag with p 0.15, and with p 0.9 when its region is masked, so the model
    cannot read a masked region's class off its tag. A tag's pieces go together (its unit is its
    region). tag_region (B, L): the region of each tag piece, -1 for padding."""
    K = region_masked.shape[1]
    chosen = (rng.uniform(K) < MASK_PROB) | (region_masked & (rng.uniform(K) < TAG_JOINT_PROB))
    return mask_units(tag_ids, tag_region, chosen, vocab, rng)


# -----------------------------------------------------------------------------
# 3. batches (docs/METHOD.md §4)

CAPTION_LEN, TEXT_LEN, MAX_TAGS = 30, 64, 50  # pieces, [CLS] and [SEP] included


def pad(seqs, value=0, dtype=torch.long):
    """A list of arrays (or lists) -> one tensor padded along the first axis, and the valid mask."""
    lengths = np.array([len(s) for s in seqs])
    T = max(1, int(lengths.max()))
    tail = np.shape(seqs[int(lengths.argmax())])[1:]
    out = np.full((len(seqs), T) + tail, value, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out), torch.from_numpy(np.arange(T) < lengths[:, None])


def text_inputs(seqs, vocab, max_len, second=None):
    """[CLS] a [SEP] (or [CLS] a [SEP] b [SEP] with segment ids 0 then 1, as BERT: the authors give
    both halves segment 0, but BERT's checkpoint was trained with 1) -> input_ids, attention_mask,
    token_type_ids."""
    rows, types = [], []
    for i, a in enumerate(seqs):
        a = np.asarray(a).tolist()  # plain ints: slicing a memory map element by element is slow
        if second is None:
            a = a[: max_len - 2]
            rows.append([vocab.cls] + a + [vocab.sep])
            types.append([0] * (len(a) + 2))
        else:
            b = np.asarray(second[i][: max_len - 3 - min(len(a), (max_len - 3) // 2)]).tolist()
            a = a[: max_len - 3 - len(b)]
            rows.append([vocab.cls] + a + [vocab.sep] + b + [vocab.sep])
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    ids, mask = pad(rows, vocab.pad)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": pad(types)[0]}


def image_inputs(entries, tag_pieces, tags=True, max_tags=MAX_TAGS):
    """Store entries -> padded region and tag tensors. Each region's tag is its detector class's
    word pieces, every piece with the region's box (docs/METHOD.md §1); tags stop at `max_tags` pieces."""
    half = entries[0]["features"].dtype == np.float16
    feats, valid = pad([e["features"] for e in entries], 0.0, torch.float16 if half else torch.float32)  # (B, K, D)
    out = {"feats": feats, "region_mask": valid,
           "boxes": pad([e["boxes"] for e in entries], 0.0, torch.float32)[0],  # (B, K, 4)
           "obj_labels": pad([e["labels"] for e in entries], -100)[0],  # (B, K)
           "obj_conf": pad([e["scores"] for e in entries], 0.0, torch.float32)[0]}
    if all("attributes" in e for e in entries):
        out["attr_labels"] = pad([e["attributes"] for e in entries], -100)[0]
        out["attr_conf"] = pad([e["attr_scores"] for e in entries], 0.0, torch.float32)[0]
    if tags:
        ids, regions = [], []
        for e in entries:
            i, r = [], []
            for k, label in enumerate(e["labels"]):
                pieces = tag_pieces[label]
                if len(i) + len(pieces) > max_tags:
                    break
                i += pieces
                r += [k] * len(pieces)
            ids.append(i)
            regions.append(r)
        out["tag_ids"], out["tag_mask"] = pad(ids)  # (B, L)
        out["tag_region"] = pad(regions, -1)[0]  # (B, L)
        region = out["tag_region"].clamp(min=0)[..., None].expand(-1, -1, 4)  # (B, L, 4)
        out["tag_boxes"] = out["boxes"].gather(1, region)  # each piece carries its region's box
    return out


def mask_image(batch, vocab, rng, donor=None):
    """Add the image objectives' masks and targets to an image batch; donor: see mask_regions."""
    batch["feat_targets"] = batch["feats"]
    batch["feats"], batch["region_masked"] = mask_regions(batch["feats"], batch["region_mask"], rng, donor)
    if "tag_ids" in batch:
        batch["tag_ids"], batch["tag_labels"] = mask_tags(batch["tag_ids"], batch["tag_region"], batch["region_masked"],
                                                          vocab, rng)
    return batch


def donor(images, image_ids):
    """mask_regions' source of replacement regions: row j of the whole batch is image image_ids[j],
    of which one region is read, not the image."""
    def regions(rows, u):
        return torch.from_numpy(np.stack([images.region(image_ids[j], f) for j, f in zip(rows.tolist(), u.tolist())]))

    return regions


class Images:
    """One or more feature stores seen as one set of image ids."""

    def __init__(self, paths):
        self.stores = [storage.FeatureStore(p) for p in paths]
        first = self.stores[0]
        for s in self.stores[1:]:
            if s.class_names != first.class_names or s.feature_dim != first.feature_dim:
                raise ValueError(f"{s.path}: other classes or feature size than {first.path}; stores must come from "
                                 f"one extractor")
        self.class_names, self.attr_names, self.feature_dim = first.class_names, first.attr_names, first.feature_dim
        self.where = {i: s for s in self.stores for i in s.ids()}
        if not self.where:
            raise ValueError(f"{', '.join(paths)}: no images in the feature store{'s' * (len(paths) > 1)}")

    def __getitem__(self, image_id):
        if image_id not in self.where:
            raise KeyError(f"image {image_id!r} is in none of the feature stores {[s.path for s in self.stores]}")
        return self.where[image_id].get(image_id, np.float16)  # half the bytes to move; the model casts

    def region(self, image_id, u):
        return self.where[image_id].region(image_id, u)

    def __contains__(self, image_id):
        return image_id in self.where


class ImagePairs:
    """The pairs of a TokenCorpus of kind "pairs" whose image `images` holds, numbered 0, 1, ... as kept.
    A pair naming another image is skipped and counted (report), unless with the file's bad lines they
    are too many (check_bad_share: ValueError). held_in says where the images were looked for."""

    def __init__(self, pairs, images, held_in):
        self.pairs, self.path = pairs, pairs.path
        self.keep = [n for n, i in enumerate(pairs.image_ids) if i in images]
        self.image_ids = [pairs.image_ids[n] for n in self.keep]
        self.missing = [i for i in pairs.image_ids if i not in images]
        self.named = f"naming images that {held_in}, e.g. {self.missing[:3]}"
        if self.missing:  # the file's bad lines count too
            storage.check_bad_share(len(self.missing) + len(pairs.skipped), len(pairs) + len(pairs.skipped),
                                    f"{self.path}: {len(self.missing)} pairs {self.named}", "lines")

    def report(self):
        """pairs.report(), and the pairs left out for their image."""
        lines = [self.pairs.report()] if self.pairs.skipped else []
        if self.missing:
            lines.append(f"{self.path}: skipped {len(self.missing)} pair(s) {self.named}")
        return "; ".join(lines) or None

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, i):
        return self.pairs[self.keep[i]]


class Corpus:
    """One pre-training data set, and how to make a masked batch of it.

    kind "image":   image ids, alone (tags + regions, or regions only without tags)
    kind "caption": captions alone, masked piece by piece
    kind "text":    general text, chunks of whole sentences, whole-word masking, NSP optional
    kind "pair":    aligned image-caption pairs, with image-text match (docs/METHOD.md §2)
    """

    def __init__(self, name, kind, vocab, items, images=None, tags=True, nsp=False, rate=1.0):
        self.name, self.kind, self.vocab, self.items, self.images = name, kind, vocab, items, images
        self.tags, self.nsp, self.rate = tags, nsp, rate
        if images is not None:
            self.tag_pieces = vocab.tag_pieces(images.class_names)
        if kind == "text":
            half = (TEXT_LEN - 3) // 2 if nsp else TEXT_LEN - 2
            self.chunks = items.chunks(half)
            if nsp:  # a first half needs a next chunk of the same document
                self.starts = np.nonzero(items.docs[self.chunks[:-1, 0]] == items.docs[self.chunks[1:, 0]])[0]

    def __len__(self):
        if self.kind == "text":
            return len(self.starts) if self.nsp else len(self.chunks)
        if self.kind == "pair":
            return len(self.items[0])
        return len(self.items)

    def batch(self, idx, rng):
        """Rows rng.rows of the masked batch of items `idx` (all of the batch's items: a row may take
        another row's image)."""
        make = {"caption": self.caption_batch, "text": self.text_batch, "image": self.image_batch,
                "pair": self.pair_batch}[self.kind]
        return make(np.asarray(idx), rng)

    def caption_batch(self, idx, rng):
        b = text_inputs([self.items[i] for i in idx[rng.rows]], self.vocab, CAPTION_LEN)
        b["input_ids"], b["mlm_labels"] = mask_text(b["input_ids"], self.vocab, rng)
        return b

    def text_batch(self, idx, rng):
        span = lambda c: self.items.span(*self.chunks[c])  # noqa: E731
        if not self.nsp:
            b = text_inputs([span(i) for i in idx[rng.rows]], self.vocab, TEXT_LEN)
        else:  # B is the next chunk with p 0.5, else a random chunk (label 1, as BERT)
            first = self.starts[idx[rng.rows]]
            is_random = rng.uniform(1)[:, 0] < 0.5
            rand = (rng.uniform(1)[:, 0] * len(self.chunks)).long().numpy()
            second = np.where(is_random.numpy(), rand, first + 1)
            b = text_inputs([span(i) for i in first], self.vocab, TEXT_LEN, second=[span(i) for i in second])
            b["nsp_labels"] = is_random.long()
        b["input_ids"], b["mlm_labels"] = mask_text(b["input_ids"], self.vocab, rng, whole_word=True)
        return b

    def image_batch(self, idx, rng):
        b = image_inputs([self.images[self.items[i]] for i in idx[rng.rows]], self.tag_pieces, self.tags)
        return mask_image(b, self.vocab, rng, donor(self.images, [self.items[i] for i in idx]))

    def pair_batch(self, idx, rng):
        """With p 0.5 the image is swapped for a different image, the image of a random pair of the set
        redrawn until it differs (LXMERT), label 1. A set whose pairs all show one image has none to
        swap in: its pairs stay matched. The caption is masked either way (LXMERT, the authors' code
        base): only the match label tells the two apart."""
        captions, image_ids = self.items
        mine = idx[rng.rows]
        several = any(i != image_ids[0] for i in image_ids)
        swap = (rng.uniform(1)[:, 0] < 0.5) & several
        draws = (rng.uniform(16) * len(image_ids)).long().numpy()  # (rows, 16) pairs to redraw from
        image_of = [image_ids[i] for i in mine]
        for j in np.nonzero(swap.numpy())[0]:
            other = next((image_ids[t] for t in draws[j] if image_ids[t] != image_of[j]), None)
            t = draws[j, -1]
            while other is None:  # 16 draws of the same image (a set of few images): walk on from the last
                t = (t + 1) % len(image_ids)
                other = image_ids[t] if image_ids[t] != image_of[j] else None
            image_of[j] = other
        b = text_inputs([captions[i] for i in mine], self.vocab, CAPTION_LEN)
        b["input_ids"], b["mlm_labels"] = mask_text(b["input_ids"], self.vocab, rng)
        b["match_labels"] = swap.long()
        image = image_inputs([self.images[i] for i in image_of], self.tag_pieces, self.tags)
        b.update(mask_image(image, self.vocab, rng, donor(self.images, [image_ids[i] for i in idx])))
        return b


def epoch_plan(sizes, rates, batch_size, seed, epoch):
    """docs/METHOD.md §4: each data set is shuffled and cut into full batches (a set smaller than a batch is
    one batch); a rate below 1 takes that share of the set, rotating so consecutive epochs cover
    all of it; then at each step a set is drawn with probability proportional to the batches it
    has left, until all are used. Returns [(set, item indices)] for the epoch."""
    g = np.random.default_rng([seed, epoch])
    queues = []
    for d, (n, rate) in enumerate(zip(sizes, rates)):
        order = np.random.default_rng([seed, d, 7]).permutation(n)  # one fixed order the epochs rotate through
        take = min(n, max(batch_size, int(n * rate)))
        start = (epoch * take) % n
        part = g.permutation(np.roll(order, -start)[:take])
        bs = min(batch_size, take)
        queues.append([part[i:i + bs] for i in range(0, take - bs + 1, bs)])
    left = np.array([len(q) for q in queues], dtype=float)
    plan, heads = [], [0] * len(queues)
    while left.sum() > 0:
        d = g.choice(len(queues), p=left / left.sum())
        plan.append((d, queues[d][heads[d]]))
        heads[d] += 1
        left[d] -= 1
    return plan


class PretrainData(torch.utils.data.Dataset):
    """This process's rows of batch number `step` of the whole run (rank of `world` processes, each
    a contiguous share). Row i of a batch is a function of (seed, step, i) alone: the data order
    and the masks are the same however the run is split among processes and workers, stopped and
    resumed."""

    def __init__(self, corpora, batch_size, seed, rank=0, world=1):
        self.corpora, self.batch_size, self.seed, self.rank, self.world = corpora, batch_size, seed, rank, world
        self.sizes = [len(c) for c in corpora]
        self.steps_per_epoch = len(epoch_plan(self.sizes, [c.rate for c in corpora], batch_size, seed, 0))
        self._plan = (None, None)

    def plan(self, epoch):
        if self._plan[0] != epoch:
            self._plan = (epoch,
                          epoch_plan(self.sizes, [c.rate for c in self.corpora], self.batch_size, self.seed, epoch))
        return self._plan[1]

    def __len__(self):
        return 2**62

    def __getitem__(self, step):
        d, idx = self.plan(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        n, r, w = len(idx), self.rank, self.world
        corpus = self.corpora[d]
        return corpus.name, corpus.batch(idx, RowRandom(self.seed, step, range(n * r // w, n * (r + 1) // w), n))


def batches(dataset, steps, workers=0, pin_memory=False):
    """(name, batch) for each step of `steps`, in order, built by `workers` processes (0: by this
    one): the same batches whatever the number of workers. A batch stays valid after the next."""
    seed = torch.Generator().manual_seed(0)  # the loader's own: the global one's draws would shift dropout
    if workers and hasattr(os, "fork"):  # without fork (Windows) the workers hand tensors over one by one
        yield from ring_batches(dataset, steps, workers, pin_memory, seed)
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers,
                                           pin_memory=pin_memory, generator=seed)


# -----------------------------------------------------------------------------
# 4. for a GPU (a student on a CPU may skip this section)
#
# DataLoader workers. A worker hands a batch to the main process tensor by tensor, each in new shared
# memory: allocating and first touching it costs more than building the batch (README, "speed").
# So batches travel through a ring of buffers shared with the workers, allocated once: a worker
# copies batch `step` into slot step % slots, the main process copies it out, and only the layout
# travels through the queue.

SLOT_BYTES = 256 << 20  # room for one batch; the pages are taken only as far as a batch fills them


def pack(batch, out=None):
    """A batch (name -> tensor) -> (buffer, layout): its tensors copied one after another into
    `out`, or where they do not fit, into a new buffer in shared memory."""
    layout, size = [], 0
    for k, v in batch.items():
        n = v.numel() * v.element_size()
        layout.append((k, v.dtype, tuple(v.shape), size, n))
        size += -(-n // 8) * 8  # 8-byte aligned: any dtype can view its part
    if out is None or size > len(out):
        # as DataLoader's collate does
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    for k, dtype, shape, at, n in layout:
        out[at:at + n].view(dtype).view(shape).copy_(batch[k])
    return out, layout


def unpack(buf, layout):
    """pack's inverse: views of the buffer, nothing copied."""
    return {k: buf[at:at + n].view(dtype).view(shape) for k, dtype, shape, at, n in layout}


class _ViaRing(torch.utils.data.Dataset):
    """The dataset as the workers see it: batch `step` goes into slot step % slots of the ring."""

    def __init__(self, dataset, slots):
        self.dataset = dataset
        shared = mmap.mmap(-1, slots * SLOT_BYTES)  # anonymous and shared: the forked workers write to the same pages
        self.ring = torch.frombuffer(shared, dtype=torch.uint8).view(slots, SLOT_BYTES)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, step):
        name, batch = self.dataset[step]
        slot = self.ring[step % len(self.ring)]
        buf, layout = pack(batch, slot)
        return name, step % len(self.ring) if buf is slot else buf, layout  # a slot number, or a batch too big for one


def ring_batches(dataset, steps, workers, pin_memory, seed):
    """batches() with worker processes that hand each batch over through the ring."""
    # The loader asks a worker for batch i as it hands out batch i - 2 * workers (prefetch 2), before
    # that one is copied out; with 2 * workers + 1 slots, batch i's slot last held batch
    # i - 2 * workers - 1, copied out by then. (A test fails with one slot fewer.)
    ring = _ViaRing(dataset, 2 * workers + 1)
    loader = torch.utils.data.DataLoader(ring, batch_size=None, sampler=steps, num_workers=workers, prefetch_factor=2,
                                         multiprocessing_context="fork", generator=seed)  # forked: they share the ring
    for name, where, layout in loader:
        src = ring.ring[where] if isinstance(where, int) else where
        size = layout[-1][3] + layout[-1][4]
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory).copy_(src[:size])
        yield name, unpack(buf, layout)



def with_positions(batch):
    """The batch and the (row, column) positions of what the model predicts (mlm_at, tag_at, region_at),
    found here on the host: found on a GPU they would make the host wait for it (positions)."""
    out = dict(batch)
    if "mlm_labels" in batch:
        out["mlm_at"] = (batch["mlm_labels"] != -100).nonzero()
    if "tag_labels" in batch:
        out["tag_at"] = (batch["tag_labels"] != -100).nonzero()
    if "region_masked" in batch:
        out["region_at"] = (batch["region_masked"] & batch["region_mask"]).nonzero()
    return out
