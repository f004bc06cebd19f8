"""
Data for U-VisualBERT: the feature store, text corpora, the built-in toy world, masking and
batching for pre-training (SPEC 2, 4, 7).

Sections, in order:
  1. the feature store: region features of many images, memory-mapped, toy or real alike
  2. text: a WordPiece tokenizer and corpora pre-tokenised into memory-mapped arrays
  3. the toy world: scenes, a simulated detector, captions, general text, downstream tasks
  4. masking (SPEC 2)
  5. batches and the proportional sampler (SPEC 4)
"""

import glob
import hashlib
import json
import os

import numpy as np

# -----------------------------------------------------------------------------
# 1. the feature store
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
        with open(meta_file) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{meta_file}: format {self.meta.get('format')!r}, expected {STORE_FORMAT!r}")
        self.class_names = self.meta["class_names"]
        self.attr_names = self.meta.get("attr_names")
        self.feature_dim = self.meta["feature_dim"]
        self._shards, self._where, self._arrays = [], {}, {}
        for index_file in sorted(glob.glob(os.path.join(path, "*.index.json"))):
            shard = index_file[: -len(".index.json")]
            with open(index_file) as f:
                index = json.load(f)
            self._check_shard(shard, index)
            s = len(self._shards)
            self._shards.append(shard)
            for i, image_id in enumerate(index["ids"]):
                if image_id in self._where:
                    other = self._shards[self._where[image_id][0]]
                    raise ValueError(f"{path}: image {image_id!r} is stored twice, in {other} and {shard}")
                self._where[image_id] = (s, index["start"][i], index["count"][i], index["width"][i], index["height"][i])

    def _check_shard(self, shard, index):
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
                raise ValueError(f"{file}: shape {arr.shape}, the index and meta.json expect ({rows}, ...), feature_dim {self.feature_dim}")

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
        if image_id not in self._where:
            raise KeyError(f"{self.path}: no features for image {image_id!r}")
        s, start, count, width, height = self._where[image_id]
        rows = slice(start, start + count)
        out = {"features": np.asarray(self._array(s, "features")[rows], dtype=np.float32),  # (K, D)
               "boxes": np.array(self._array(s, "boxes")[rows]),  # (K, 4)
               "labels": np.array(self._array(s, "labels")[rows]),  # (K,)
               "scores": np.array(self._array(s, "scores")[rows]),  # (K,)
               "width": width, "height": height}
        if self._array(s, "attrs") is not None:
            out["attributes"] = np.array(self._array(s, "attrs")[rows])
            out["attr_scores"] = np.array(self._array(s, "attr_scores")[rows])
        return out


def _save_npy(file, arr):
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, file)


def write_json(file, obj):
    """Write JSON to a temporary file and rename it: readers never see half a file."""
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, file)


class FeatureWriter:
    """Appends images to a feature store in shards of `shard_size` images.

    Several writers (processes) may fill one store at once if each has its own `prefix`. Opening
    an existing store checks that it was made the same way (same feature size, classes and
    extractor settings), and `done_ids()` tells which images a rerun can skip.
    """

    def __init__(self, path, feature_dim, class_names, attr_names=None, extractor=None, prefix="shard", shard_size=1000):
        self.path, self.prefix, self.shard_size, self.feature_dim = path, prefix, shard_size, int(feature_dim)
        os.makedirs(path, exist_ok=True)
        meta = {"format": STORE_FORMAT, "feature_dim": int(feature_dim), "class_names": list(class_names),
                "attr_names": list(attr_names) if attr_names is not None else None, "extractor": extractor or {}}
        meta_file = os.path.join(path, "meta.json")
        if os.path.exists(meta_file):
            with open(meta_file) as f:
                old = json.load(f)
            meta = json.loads(json.dumps(meta))  # as it would read back (tuples become lists)
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(f"{meta_file}: this store was made with other settings ({', '.join(diff)} differ); "
                                 "write to a new folder instead of mixing features from two extractors")
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
        self._buffer.append((str(image_id), features, boxes, labels, scores, int(width), int(height), attributes, attr_scores))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self):
        """Write the buffered images as one complete shard."""
        if not self._buffer:
            return
        shard = os.path.join(self.path, f"{self.prefix}-{self._next:05d}")
        ids, feats, boxes, labels, scores, widths, heights, attrs, attr_scores = zip(*self._buffer)
        counts = [len(b) for b in boxes]
        _save_npy(f"{shard}.features.npy", np.concatenate(feats).astype(np.float16))
        _save_npy(f"{shard}.boxes.npy", np.concatenate(boxes).astype(np.float32).reshape(-1, 4))
        _save_npy(f"{shard}.labels.npy", np.concatenate(labels).astype(np.int32))
        _save_npy(f"{shard}.scores.npy", np.concatenate(scores).astype(np.float32))
        if attrs[0] is not None:
            _save_npy(f"{shard}.attrs.npy", np.concatenate(attrs).astype(np.int32))
            _save_npy(f"{shard}.attr_scores.npy", np.concatenate(attr_scores).astype(np.float32))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        write_json(f"{shard}.index.json", {"ids": list(ids), "start": starts, "count": counts,
                                           "width": list(widths), "height": list(heights)})
        self._next += 1
        self._buffer = []

    close = flush
