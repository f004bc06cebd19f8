"""
What lies on disk, and how it is written and read: atomic writes and JSON files, the feature store
(region features of many images, read and written), text pre-tokenised into a memory-mapped cache,
bad-record accounting, and checkpoints. data.py, the scripts and toy.py read and write through it;
it imports no module of the project.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import torch

# -----------------------------------------------------------------------------
# files: written whole or not at all


class WriteError(Exception):
    """A file that could not be written (a full disk, a quota, a folder gone): its path and the system's
    reason, in one line. What was there before is intact, and nothing half-written is left."""

    def __init__(self, file, error):
        super().__init__(f"{file}: cannot be written ({getattr(error, 'strerror', None) or error})")


def write_atomic(file, write, mode="wb"):
    """write(f) to a temporary file renamed to `file`: readers never see half a file. One temporary
    name per process: writers may run side by side. An OSError is a WriteError naming `file`."""
    tmp = f"{file}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, file)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(file, e) from None


def write_json(file, obj, indent=None):
    """`obj` as JSON, written atomically (json.dumps runs in C, json.dump does not)."""
    write_atomic(file, lambda f: f.write(json.dumps(obj, indent=indent)), "w")


def read_json(file):
    """A JSON file, with a clear error naming the file when it is missing, unreadable or malformed."""
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{file}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an empty file
        raise ValueError(f"{file}: not valid JSON ({e})") from None


# -----------------------------------------------------------------------------
# the feature store
#
# A folder:
#   meta.json                 {"format", "feature_dim", "class_names", "attr_names", "extractor": {...}}
#   NAME.features.npy         (R, D) float16, R = all regions of the shard's images, row after row
#   NAME.boxes.npy            (R, 4) float32, normalised x1, y1, x2, y2
#   NAME.labels.npy           (R,) int32, the detector's top class (the tag)
#   NAME.scores.npy           (R,) float32, its confidence
#   NAME.attrs.npy            (R,) int32 and NAME.attr_scores.npy (R,) float32, where the detector has attributes
#   NAME.index.json           {"ids", "start", "count", "width", "height"}: image i is rows start[i]:start[i]+count[i]
# A shard is complete once its index exists: the index is written last, and every file is written
# to a temporary name and renamed, so a killed writer leaves complete shards and nothing half-read.

STORE_FORMAT = "uvisualbert-features/1"
ARRAYS = {"features": np.float16, "boxes": np.float32, "labels": np.int32, "scores": np.float32,
          "attrs": np.int32, "attr_scores": np.float32}


class FeatureStore:
    """Read-only access to a feature store: `store[image_id]` -> dict of numpy arrays."""

    def __init__(self, path):
        self.path = path
        meta_file = os.path.join(path, "meta.json")
        if not os.path.exists(meta_file):
            raise FileNotFoundError(f"{path}: not a feature store (no meta.json); make one with extract_features.py")
        self.meta = read_json(meta_file)
        if not isinstance(self.meta, dict) or self.meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{meta_file}: not the meta.json of a feature store (format {STORE_FORMAT!r}); "
                             "make one with extract_features.py")
        self.class_names = self.meta["class_names"]
        self.attr_names = self.meta.get("attr_names")
        self.feature_dim = self.meta["feature_dim"]
        self._shards, self._where, self._arrays = [], {}, {}
        for index_file in sorted(glob.glob(os.path.join(path, "*.index.json"))):
            shard = index_file[: -len(".index.json")]
            index = read_json(index_file)
            self._check_shard(shard, index)
            s = len(self._shards)
            self._shards.append(shard)
            for i, image_id in enumerate(index["ids"]):
                if image_id in self._where:
                    other = self._shards[self._where[image_id][0]]
                    raise ValueError(f"{path}: image {image_id!r} is stored twice, in {other} and {shard}")
                self._where[image_id] = (s, index["start"][i], index["count"][i], index["width"][i], index["height"][i])

    def _check_shard(self, shard, index):
        if not isinstance(index, dict) or not {"ids", "start", "count", "width", "height"} <= set(index):
            raise ValueError(f"{shard}.index.json: not a shard index (ids, start, count, width, height)")
        rows = sum(index["count"])
        for name in ARRAYS:
            file = f"{shard}.{name}.npy"
            if not os.path.exists(file):
                if name in ("attrs", "attr_scores"):
                    continue
                raise ValueError(f"{file}: missing; the shard's index lists {len(index['ids'])} images")
            try:
                arr = np.load(file, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"{file}: truncated or corrupt ({e})") from None
            if arr.shape[0] != rows or (name == "features" and arr.shape[1] != self.feature_dim):
                raise ValueError(f"{file}: shape {arr.shape}, the index and meta.json expect ({rows}, ...), "
                                 f"feature_dim {self.feature_dim}")

    def _array(self, s, name):
        key = (s, name)
        if key not in self._arrays:  # opened lazily, so each DataLoader worker maps its own
            file = f"{self._shards[s]}.{name}.npy"
            self._arrays[key] = np.load(file, mmap_mode="r") if os.path.exists(file) else None
        return self._arrays[key]

    def __len__(self):
        return len(self._where)

    def __contains__(self, image_id):
        return image_id in self._where

    def ids(self):
        return list(self._where)

    def __getitem__(self, image_id):
        return self.get(image_id)

    def get(self, image_id, dtype=np.float32):
        """The image's entry; features as `dtype`. float16 is what is stored: it skips a conversion,
        and the features are then a read-only view of the memory map."""
        if image_id not in self._where:
            raise KeyError(f"{self.path}: no features for image {image_id!r}")
        s, start, count, width, height = self._where[image_id]
        rows = slice(start, start + count)
        out = {"features": self.finite(np.asarray(self._array(s, "features")[rows], dtype=dtype), image_id),  # (K, D)
               "boxes": np.array(self._array(s, "boxes")[rows]),  # (K, 4)
               "labels": np.array(self._array(s, "labels")[rows]),  # (K,)
               "scores": np.array(self._array(s, "scores")[rows]),  # (K,)
               "width": width, "height": height}
        if self._array(s, "attrs") is not None:
            out["attributes"] = np.array(self._array(s, "attrs")[rows])
            out["attr_scores"] = np.array(self._array(s, "attr_scores")[rows])
        return out

    def region(self, image_id, u):
        """The features (D,) of region floor(u * regions) of the image, as stored (float16): one row read."""
        s, start, count, _, _ = self._where[image_id]
        return self.finite(np.asarray(self._array(s, "features")[start + int(u * count)]), image_id)

    def finite(self, features, image_id):
        """The features, or a NonFinite naming the store and the image if any is NaN or infinite: found
        here, before a batch reaches the model, it is a corrupt store, not a failure of training."""
        if not np.isfinite(features).all():
            raise NonFinite(f"{self.path}: image {image_id!r} has non-finite features (NaN or infinite): the store "
                            f"is corrupt; extract its images again")
        return features


class NonFinite(ValueError):
    """Region features that are NaN or infinite: a store that holds them is corrupt, and none is written."""


def _save_npy(file, arr):
    write_atomic(file, lambda f: np.save(f, arr))


class FeatureWriter:
    """Appends images to a feature store in shards of `shard_size` images.

    Several writers (processes) may fill one store at once if each has its own `prefix`. Opening
    an existing store checks that it was made the same way (same feature size, classes and
    extractor settings), and `done_ids()` tells which images a rerun can skip.
    """

    def __init__(self, path, feature_dim, class_names, attr_names=None, extractor=None, prefix="shard",
                 shard_size=1000):
        self.path, self.prefix, self.shard_size, self.feature_dim = path, prefix, shard_size, int(feature_dim)
        os.makedirs(path, exist_ok=True)
        meta = {"format": STORE_FORMAT, "feature_dim": int(feature_dim), "class_names": list(class_names),
                "attr_names": list(attr_names) if attr_names is not None else None, "extractor": extractor or {}}
        meta_file = os.path.join(path, "meta.json")
        if os.path.exists(meta_file):
            old = read_json(meta_file)
            meta = json.loads(json.dumps(meta))  # as it would read back (tuples become lists)
            if old != meta:
                raise ValueError(f"{meta_file}: this store was made with other settings "
                                 f"({'; '.join(differences(old, meta))}); write to a new folder instead of mixing "
                                 "features from two extractors")
        else:
            write_json(meta_file, meta)
        done = sorted(glob.glob(os.path.join(path, f"{prefix}-*.index.json")))
        self._next = 1 + max([int(f.rsplit("-", 1)[1].split(".")[0]) for f in done], default=-1)
        self._buffer = []

    def done_ids(self):
        """Ids of every image already stored, by any writer."""
        ids = set()
        for f in glob.glob(os.path.join(self.path, "*.index.json")):
            with open(f) as fh:
                ids.update(json.load(fh)["ids"])
        return ids

    def add(self, image_id, features, boxes, labels, scores, width, height, attributes=None, attr_scores=None):
        K = len(boxes)
        assert features.shape == (K, self.feature_dim) and len(labels) == K and len(scores) == K, \
            f"image {image_id}: features {features.shape}, {K} boxes, {len(labels)} labels, {len(scores)} scores"
        with np.errstate(over="ignore"):  # a feature beyond float16's range would be stored as inf
            stored = np.asarray(features, ARRAYS["features"])
        if not (np.isfinite(stored).all() and np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise NonFinite(f"image {image_id!r}: non-finite features, boxes or scores (NaN, or beyond float16's "
                            f"range); not written")
        self._buffer.append((str(image_id), features, boxes, labels, scores, int(width), int(height),
                             attributes, attr_scores))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self):
        """Write the buffered images as one complete shard."""
        if not self._buffer:
            return
        shard = os.path.join(self.path, f"{self.prefix}-{self._next:05d}")
        ids, feats, boxes, labels, scores, widths, heights, attrs, attr_scores = zip(*self._buffer)
        counts = [len(b) for b in boxes]
        boxes = [np.reshape(b, (-1, 4)) for b in boxes]
        for name, parts in zip(ARRAYS, (feats, boxes, labels, scores, attrs, attr_scores)):
            if parts[0] is not None:  # attributes are optional
                _save_npy(f"{shard}.{name}.npy", np.concatenate(parts).astype(ARRAYS[name]))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        write_json(f"{shard}.index.json", {"ids": list(ids), "start": starts, "count": counts,
                                           "width": list(widths), "height": list(heights)})
        self._next += 1
        self._buffer = []

    close = flush


def differences(old, new, prefix=""):
    """Each setting of two meta.json dicts that differs, with both values: "extractor.nms 0.3 (now 0.5)"."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {short(a)} (now {short(b)})")
    return out


def short(value, width=60):
    """repr(value), cut to `width` characters (a list of 1,600 class names)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# -----------------------------------------------------------------------------
# text, tokenised once and cached

# Bad records. A record that cannot be used (a line not UTF-8, a malformed TSV row or task record, a pair
# whose image is in no store) is skipped, named and counted, and the run goes on; but when more than
# MAX_BAD_SHARE of a file's records are bad, the file is not what the flag says (another format, another
# split's annotations, the features of other images) and the run stops. A tenth: far above what a real
# data set loses to a broken download or a hand edit (a few records in thousands), far below the whole
# file that a wrong file loses.
MAX_BAD_SHARE = 0.1


def check_bad_share(bad, total, first, unit="records"):
    """ValueError when `bad` of a file's `total` records are more than MAX_BAD_SHARE; `first` names the
    first bad record and what is wrong with it (the message starts with it)."""
    if bad > MAX_BAD_SHARE * total:
        raise ValueError(f"{first}; {bad} of {total} {unit} bad ({bad / total:.0%}), more than the "
                         f"{MAX_BAD_SHARE:.0%} a run skips")


class TokenCorpus:
    """Token pieces of many text items (captions, or sentences grouped into documents) in one
    flat memory-mapped int32 array with offsets: item i is tokens[offsets[i]:offsets[i+1]].
    Built once per (file, vocabulary) and cached, so a corpus of millions of lines costs no
    memory and no start-up time after the first run.

    kind "lines": one item per non-empty line (captions).
    kind "docs":  one item per sentence line; a blank line separates documents (BookCorpus).
    kind "pairs": JSON lines {"image_id", "caption"}; items are captions, `image_ids` beside.
    """

    MAX_LINE = 100_000  # characters; a longer "line" is not a sentence (a binary file, a missing newline)

    def __init__(self, path, vocab, kind, cache_dir="cache"):
        st = os.stat(path) if os.path.exists(path) else None
        if st is None:
            raise FileNotFoundError(f"{path}: text file not found")
        key = json.dumps(["tokens.bin v1", os.path.abspath(path), st.st_size, st.st_mtime_ns, kind, vocab.tokens])
        key = hashlib.sha1(key.encode()).hexdigest()[:16]
        folder = os.path.join(cache_dir, f"{os.path.basename(path)}-{key}")
        if not os.path.exists(os.path.join(folder, "done")):
            new_cache = not os.path.exists(cache_dir)
            try:
                self._build(path, vocab, kind, folder)
            except BaseException:  # a file with no usable line, a kill: no half cache is left behind
                shutil.rmtree(folder, ignore_errors=True)
                if new_cache:
                    shutil.rmtree(cache_dir, ignore_errors=True)
                raise
        self.path = path
        tokens = os.path.join(folder, "tokens.bin")
        self.tokens = np.memmap(tokens, dtype=np.int32, mode="r") if os.path.getsize(tokens) else np.zeros(0, np.int32)
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        self.docs = np.load(os.path.join(folder, "docs.npy"))  # (N,) document of each item
        self.skipped = read_json(os.path.join(folder, "skipped.json"))  # [[line, reason]]: bad records left out
        self.image_ids = read_json(os.path.join(folder, "image_ids.json")) if kind == "pairs" else None

    @staticmethod
    def _build(path, vocab, kind, folder):
        """Read the file line by line (it may be far larger than memory), tokenise in blocks and
        append to tokens.bin. A bad line is skipped and listed; a file with no usable line is fatal."""
        os.makedirs(folder, exist_ok=True)
        lengths, docs, image_ids, skipped, block, doc, blank = [], [], [], [], [], 0, True
        with open(path, "rb") as f, open(os.path.join(folder, "tokens.bin"), "wb") as out:
            def flush():
                for ids in vocab.encode_batch(block):
                    out.write(np.asarray(ids, dtype=np.int32).tobytes())
                    lengths.append(len(ids))
                block.clear()

            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    skipped.append([n, f"not valid UTF-8 (byte {raw[e.start]:#x} at column {e.start + 1})"])
                    continue
                if len(line) > TokenCorpus.MAX_LINE:
                    skipped.append([n, f"{len(line)} characters long, over {TokenCorpus.MAX_LINE}"])
                    continue
                if not line.strip():
                    if kind == "docs" and not blank:
                        doc += 1  # a blank line ends a document; several in a row, or an empty document, change nothing
                    blank = True
                    continue
                blank = False
                if kind == "pairs":
                    try:
                        record = json.loads(line)
                        image_id, text = str(record["image_id"]), str(record["caption"])
                    except (ValueError, KeyError, TypeError):
                        skipped.append([n, "not a JSON object with image_id and caption"])
                        continue
                    image_ids.append(image_id)
                else:
                    text = line
                block.append(text)
                docs.append(doc if kind == "docs" else len(docs))
                if len(block) == 10000:
                    flush()
            flush()
        if not docs:
            if skipped:
                raise ValueError(f"{path}: no usable line ({len(skipped)} bad, the first: line {skipped[0][0]}, "
                                 f"{skipped[0][1]})")
            raise ValueError(f"{path}: the file is empty")
        _save_npy(os.path.join(folder, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        _save_npy(os.path.join(folder, "docs.npy"), np.asarray(docs, dtype=np.int64))
        write_json(os.path.join(folder, "skipped.json"), skipped)
        if kind == "pairs":
            write_json(os.path.join(folder, "image_ids.json"), image_ids)
        open(os.path.join(folder, "done"), "w").close()

    def report(self):
        """One line on the records left out, or None."""
        if self.skipped:
            first = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:3])
            more = "; ..." if len(self.skipped) > 3 else ""
            return f"{self.path}: skipped {len(self.skipped)} bad line(s) ({first}{more})"

    def check_bad_share(self):
        """ValueError when too many of the file's lines were bad (check_bad_share)."""
        if self.skipped:
            n, why = self.skipped[0]
            check_bad_share(len(self.skipped), len(self) + len(self.skipped), f"{self.path}: line {n}: {why}", "lines")

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def chunks(self, max_pieces):
        """Runs of whole consecutive sentences of one document, each at most `max_pieces` long
        (a longer sentence is a chunk of its own, cut later): (start, end) item ranges (docs/METHOD.md §2)."""
        lengths = np.diff(self.offsets)
        out, start, size = [], 0, 0
        for i in range(len(self)):
            if i > start and (self.docs[i] != self.docs[start] or size + lengths[i] > max_pieces):
                out.append((start, i))
                start, size = i, 0
            size += lengths[i]
        out.append((start, len(self)))
        return np.asarray(out, dtype=np.int64)

    def span(self, start, end):
        return self.tokens[self.offsets[start]:self.offsets[end]]


# -----------------------------------------------------------------------------
# checkpoints: everything to resume


def save_checkpoint(path, model, optimizer, scaler, step, args, vocab, class_names, **extra):
    """Everything to resume, written atomically; `extra` adds entries (finetune.py: its head, its generator)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": model.cfg.to_dict(), "vocab": vocab.tokens, "class_names": class_names,
            "args": vars(args), "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, **extra}
    write_atomic(path, lambda f: torch.save(ckpt, f))  # a kill mid-save leaves the previous checkpoint whole


def load_checkpoint(path):
    """A checkpoint, or one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SystemExit(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def load_weights(module, state, src):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # the first line names the mismatch; the rest lists every tensor
        raise SystemExit(f"{src}: its weights do not fit the model ({str(e).splitlines()[0].strip()} ...)") from None


def restore(ckpt, optimizer, scaler):
    """--resume: the optimiser, the scaler and the global random states as the checkpoint left them;
    returns its step."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # saved by an fp16 run (a disabled scaler saves nothing)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    return ckpt["step"]
