"""
U-VisualBERT: one BERT encoder over text, detector tags and image regions.

Papers: Devlin et al. 2019 (BERT); Li et al. 2020 (VisualBERT); Li, You, Wang, Zareian, Chang and Chang,
NAACL 2021, "Unsupervised Vision-and-Language Pre-training Without Parallel Images and Captions".
The recipe, with every number, is docs/METHOD.md; comments cite its sections ("docs/METHOD.md §1").

The file reads from the smallest part up: config, embeddings, attention, layer, encoder, heads,
losses, loading a Hugging Face BERT checkpoint.

The input sequence is [text ; tags ; regions] (docs/METHOD.md §1: the authors' order). Any part may be
absent: a text batch has text only, an image batch has tags and regions (or regions only, in the
_NT variants), an aligned batch has all three.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    dropout: float = 0.1
    ln_eps: float = 1e-12
    feat_dim: int = 2048  # region feature size (2048 bottom-up, 1024 torchvision box head)
    num_labels: int = 1600  # detector classes (1600 Visual Genome objects)
    num_attrs: int = 0  # detector attributes (400 in Visual Genome); 0 = no attribute head
    init_std: float = 0.02  # weights start as N(0, init_std^2): BERT's initializer_range, made for hidden 768

    def to_dict(self):
        return asdict(self)


# BERT-base is the paper's model; the others are for the toy world and tests.
PRESETS = {
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072),
    "small": dict(hidden=256, layers=4, heads=4, ffn=1024, max_positions=128, init_std=0.0625),
    "tiny": dict(hidden=128, layers=2, heads=4, ffn=512, max_positions=128, init_std=0.088, dropout=0.0),
}
# The narrow presets start at 1/sqrt(hidden), not BERT's 0.02, which at hidden 128 keeps attention logits near
# zero and a word-to-tag match unfound for hundreds of steps; tiny has 4 heads (one read of the answer each by
# [CLS] in the last layer) and no dropout. The measurements behind both are in docs/LOG.md.


# -----------------------------------------------------------------------------
# embeddings (docs/METHOD.md §1, paper section 3.2)


class Embeddings(nn.Module):
    """Text pieces as in BERT, regions as feature + box, tags as word + their region's box."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden
        # text: LN_text(word[w] + pos[i] + seg[s]), BERT's names so checkpoints load as they are
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H)
        self.position_embeddings = nn.Embedding(cfg.max_positions, H)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, H)
        self.LayerNorm = nn.LayerNorm(H, eps=cfg.ln_eps)
        # region: LN_feat(W_feat f) + LN_box(W_box box)
        self.feat = nn.Sequential(nn.Linear(cfg.feat_dim, H), nn.LayerNorm(H, eps=cfg.ln_eps))
        self.box = nn.Sequential(nn.Linear(4, H), nn.LayerNorm(H, eps=cfg.ln_eps))
        # tag piece: LN_tag(word[t]) + LN_box(W_box box_of_its_region);
        # word[] is self.word_embeddings and LN_box(W_box .) is self.box: the two sharings of docs/METHOD.md §1
        self.tag_ln = nn.LayerNorm(H, eps=cfg.ln_eps)

    def text(self, input_ids, token_type_ids=None):
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)  # (B, T, H)

    def tags(self, tag_ids, tag_boxes):
        return self.tag_ln(self.word_embeddings(tag_ids)) + self.box(tag_boxes)  # (B, L, H)

    def regions(self, feats, boxes):
        feats = feats.to(self.feat[0].weight.dtype)  # features may come as stored, in float16
        return self.region_features(feats) + self.box(boxes)  # (B, K, H)

    def region_features(self, feats):
        """LN_feat(W_feat f), in fp32 under fp16 autocast: a masked region's features are zeros, LN_feat's
        input there is all but constant, and its backward overflowed float16 (docs/LOG.md 14)."""
        device = feats.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
            with torch.autocast(device, enabled=False):
                return self.feat(feats)
        return self.feat(feats)


# -----------------------------------------------------------------------------
# transformer


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.hidden % cfg.heads == 0
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout
        self.keep_probs, self.probs = False, None  # ask.py --show sets keep_probs to see what each position attends to

    def forward(self, x, key_mask):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :],  # (B, 1, 1, T): True = attend
            dropout_p=self.dropout if self.training else 0.0)
        if self.keep_probs:  # the fused kernel does not return its weights: the same softmax again, by hand
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)  # (B, nh, T, T)
            self.probs = logits.float().masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y)


class Layer(nn.Module):
    """A post-LayerNorm BERT layer."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.ffn_in = nn.Linear(cfg.hidden, cfg.ffn)
        self.ffn_out = nn.Linear(cfg.ffn, cfg.hidden)
        self.ffn_ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_mask):
        x = self.attn_ln(x + self.drop(self.attn(x, key_mask)))
        x = self.ffn_ln(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))  # erf GELU, as BERT
        return x


# -----------------------------------------------------------------------------
# heads


class Transform(nn.Module):
    """dense, GELU, LayerNorm: the front of BERT's MLM head and of the visual heads."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)

    def forward(self, x):
        return self.ln(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Predicts masked text pieces and masked tag pieces (docs/METHOD.md §2: the same head for both)."""

    def __init__(self, cfg, word_embeddings):
        super().__init__()
        self.transform = Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: the decoder *is* the word table
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):
        return self.decoder(self.transform(h)) + self.bias  # (..., vocab)


class VisualHead(nn.Module):
    """LXMERT's visual head family: one transform, then a linear decoder per visual objective."""

    def __init__(self, cfg):
        super().__init__()
        self.transform = Transform(cfg)
        self.feat = nn.Linear(cfg.hidden, cfg.feat_dim)  # feature regression
        self.label = nn.Linear(cfg.hidden, cfg.num_labels)  # detector-label classification
        self.attr = nn.Linear(cfg.hidden, cfg.num_attrs) if cfg.num_attrs else None

    def forward(self, h):
        t = self.transform(h)
        return self.feat(t), self.label(t), (self.attr(t) if self.attr is not None else None)


# -----------------------------------------------------------------------------
# the model


INPUTS = ("input_ids", "attention_mask", "token_type_ids", "tag_ids", "tag_boxes", "tag_mask", "feats", "boxes",
          "region_mask")  # forward's arguments


class VisualBERT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])
        self.drop = nn.Dropout(cfg.dropout)
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.mlm = MLMHead(cfg, self.embeddings.word_embeddings)
        self.nsp = nn.Linear(cfg.hidden, 2)  # next sentence / image-text match; class 0 = "is next / matched", as BERT
        self.visual = VisualHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m):  # BERT's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def from_bert(path, **overrides):
        """A model whose BERT part is the Hugging Face BERT checkpoint at `path` (config_from_hf, load_bert)."""
        return load_bert(VisualBERT(config_from_hf(path, **overrides)), path)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                tag_ids=None, tag_boxes=None, tag_mask=None,
                feats=None, boxes=None, region_mask=None):
        """Encode [text ; tags ; regions]; each part is optional. Returns the hidden states
        (B, T+L+K, H) and a dict of the slices where each part lies."""
        parts, masks, spans = [], [], {}

        def add(name, x, mask):
            start = sum(p.shape[1] for p in parts)
            spans[name] = slice(start, start + x.shape[1])
            parts.append(x)
            masks.append(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool())

        if input_ids is not None:
            add("text", self.embeddings.text(input_ids, token_type_ids), attention_mask)
        if tag_ids is not None:
            add("tags", self.embeddings.tags(tag_ids, tag_boxes), tag_mask)
        if feats is not None:
            add("regions", self.embeddings.regions(feats, boxes), region_mask)
        x = self.drop(torch.cat(parts, dim=1))  # (B, T, H); dropout once, no LN over the whole (docs/METHOD.md §1)
        key_mask = torch.cat(masks, dim=1)  # (B, T)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x, spans

    def encode(self, batch):
        """forward on the inputs a batch of data.py holds (it holds labels too)."""
        return self(**{k: batch[k] for k in INPUTS if k in batch})

    def pool(self, h):
        """BERT's pooled output: dense + tanh over the first text token ([CLS])."""
        return torch.tanh(self.pooler(h[:, 0]))

    def mlm_logits(self, input_ids, attention_mask=None, token_type_ids=None):
        """(B, T, vocab) MLM logits for text alone. A public interface: keep its name and signature."""
        h, _ = self(input_ids, attention_mask, token_type_ids)
        return self.mlm(h)

    # -------------------------------------------------------------------------
    # pre-training losses (docs/METHOD.md §2)

    def count_targets(self, batch):
        """What each objective's sum is divided by, from the labels of a batch of data.py alone (no
        forward): {objective: count}, in OBJECTIVES' order, for the objectives the batch trains. Masked
        text pieces and tags, sentences, and every valid region for the visual terms.

        Text keys: input_ids, attention_mask, token_type_ids, mlm_labels, [nsp_labels].
        Image keys: [tag_ids, tag_boxes, tag_mask, tag_labels], feats, boxes, region_mask,
        feat_targets, region_masked, obj_labels, obj_conf, [attr_labels, attr_conf].
        Aligned batches have both, plus match_labels. Labels are -100 where nothing is predicted.
        Without tag keys (the _NT variants) no tag enters the sequence."""
        counts = {}
        if "input_ids" in batch:
            counts["mlm"] = (batch["mlm_labels"] != -100).sum()
        for key in ("nsp", "match"):
            if f"{key}_labels" in batch:
                counts[key] = batch[f"{key}_labels"].new_full((), len(batch[f"{key}_labels"]))
        if "tag_ids" in batch:
            counts["tag"] = (batch["tag_labels"] != -100).sum()
        if "feats" in batch:
            counts["feat"] = counts["label"] = batch["region_mask"].sum()  # every valid region counts
            if self.visual.attr is not None and "attr_labels" in batch:
                counts["attr"] = counts["feat"]
        return {k: counts[k].float() for k in OBJECTIVES if k in counts}

    def pretrain_loss(self, batch):
        """The pre-training loss of a batch, in parts: each objective of count_targets(batch) summed
        over the batch, and its count, two (N,) fp32 tensors in that order; and how many of the batch's
        pairs the match head gets right (0 without pairs: the match accuracy). One batch's loss is
        (sums / counts).sum(); a training step divides by the global batch's counts instead."""
        h, spans = self.encode(batch)
        sums, right = {}, h.new_zeros((), dtype=torch.long)
        if "input_ids" in batch:
            sums["mlm"] = masked_lm_sum(self.mlm, h[:, spans["text"]], batch["mlm_labels"], batch.get("mlm_at"))
            for key in ("nsp", "match"):
                if f"{key}_labels" in batch:
                    logits = self.nsp(self.pool(h)).float()
                    sums[key] = F.cross_entropy(logits, batch[f"{key}_labels"], reduction="sum")
                    if key == "match":
                        right = (logits.detach().argmax(-1) == batch["match_labels"]).sum()
        if "tag_ids" in batch:
            sums["tag"] = masked_lm_sum(self.mlm, h[:, spans["tags"]], batch["tag_labels"], batch.get("tag_at"))
        if "feats" in batch:
            sums.update(visual_sums(self.visual, h[:, spans["regions"]], batch))
        counts = self.count_targets(batch)
        return torch.stack([sums[k].float() for k in counts]), torch.stack(list(counts.values())), right


OBJECTIVES = ("mlm", "nsp", "match", "tag", "feat", "label", "attr")  # every pre-training objective, in this order


def positions(mask, given=None):
    """(rows, columns) where `mask` holds; `given`: the same found earlier on the host (with_positions),
    as finding them on a GPU would make the host wait for it."""
    at = mask.nonzero() if given is None else given  # (N, 2)
    return at[:, 0], at[:, 1]


def masked_lm_sum(head, h, labels, at=None):
    """Cross-entropy summed over the masked positions. The vocabulary projection runs on those
    positions alone, which saves most of the head's cost (15% are masked)."""
    at = positions(labels != -100, at)
    logits = head(h[at])  # (N, vocab); N may be 0, and the sum is then a zero with a gradient graph
    return F.cross_entropy(logits.float(), labels[at], reduction="sum")


MASK_PROB = 0.15  # of text pieces, regions and tags (data.py masks them); the visual losses divide by it


def visual_sums(head, h, batch):
    """Feature regression, detector-label (and attribute) classification of masked regions.

    Paper: the visual objectives are computed on masked regions; the authors' code (from LXMERT)
    classifies every region. We follow the paper, so the head runs on masked regions alone. Both
    weight each region by the detector's confidence, average over all regions of the batch, and
    scale by 1/0.15 (authors' code), so a term is about the mean over masked regions. Regression
    is smooth-L1 (beta 1), averaged over the feature dimension, as in the authors' code.
    h (B, K, H) the regions' hidden states; head(x) -> (features, label logits, attribute logits).
    Returns the sums; count_targets gives what they are divided by, the batch's valid regions.
    """
    sel = positions(batch["region_masked"].bool() & batch["region_mask"].bool(), batch.get("region_at"))
    feat, label, attr = head(h[sel])  # (N, D), (N, C), (N, A)
    regression = F.smooth_l1_loss(feat.float(), batch["feat_targets"][sel].float(), reduction="none", beta=1.0)
    ce = F.cross_entropy(label.float(), batch["obj_labels"][sel], reduction="none")
    out = {"feat": regression.mean(-1).sum() / MASK_PROB, "label": (ce * batch["obj_conf"][sel]).sum() / MASK_PROB}
    if attr is not None and "attr_labels" in batch:
        ce = F.cross_entropy(attr.float(), batch["attr_labels"][sel].clamp(min=0), reduction="none")
        out["attr"] = (ce * batch["attr_conf"][sel]).sum() / MASK_PROB
    return out


# -----------------------------------------------------------------------------
# speed accounting: model FLOPs per step and the device's peak, for MFU


def train_flops(cfg, batch, seq_len, predicted=0):
    """FLOPs of one training step (forward + backward = 3x forward, 2 FLOPs per multiply-add):
    the layers' matrices, attention's two T x T products, and the vocabulary projection at the
    `predicted` (masked) positions. Embedding look-ups and the small heads are left out."""
    H, L = cfg.hidden, cfg.layers
    matrices = L * (4 * H * H + 2 * H * cfg.ffn)  # parameters touched per token
    return 6 * batch * seq_len * matrices + 12 * L * batch * seq_len * seq_len * H + 6 * predicted * H * cfg.vocab_size


# Dense (not sparse) peak FLOP/s from the vendors' data sheets: (bf16/fp16, tf32) per device name.
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
              "A10": (125e12, 62.5e12), "L4": (121e12, 60e12), "A6000": (155e12, 77e12), "4090": (165e12, 83e12),
              "3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12)}


def peak_flops(device, dtype):
    """The device's peak for this dtype, or None where we do not know it (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return half if dtype in ("bf16", "fp16") else tf32
    return None


# -----------------------------------------------------------------------------
# loading a Hugging Face BERT checkpoint (docs/METHOD.md §8)

# Hugging Face name -> ours. Applied in order to every key after the "bert." prefix is dropped.
HF_RENAMES = [
    (r"\.gamma$", ".weight"),  # old checkpoints
    (r"\.beta$", ".bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1.attn."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_ln."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_ln."),
    (r"^pooler\.dense\.", "pooler."),
    (r"^cls\.predictions\.transform\.dense\.", "mlm.transform.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm.transform.ln."),
    (r"^cls\.predictions\.bias$", "mlm.bias"),
    (r"^cls\.seq_relationship\.", "nsp."),
]
# in a checkpoint but not loaded: the position-id buffer, and the decoder, which is the word table
HF_IGNORED = re.compile(r"(position_ids|cls\.predictions\.decoder\.(weight|bias))$")


def hf_to_ours(key):
    key = key[len("bert."):] if key.startswith("bert.") else key
    for pattern, repl in HF_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def read_safetensors(path):
    """A minimal reader of the safetensors format (8-byte header size, JSON header, raw data),
    so loading needs no package beyond torch."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:  # UnicodeDecodeError too
            raise ValueError(f"{path}: not a safetensors file (no JSON header)") from None
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] not in dtypes or end > len(data):
            raise ValueError(f"{path}: tensor {name} is unreadable (dtype {info['dtype']}, bytes {start}-{end} of "
                             f"{len(data)})")
        dtype = dtypes[info["dtype"]]
        t = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def config_from_hf(path, **overrides):
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            c = json.load(f)
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
    if not isinstance(c, dict) or not set(keys) <= set(c):
        raise ValueError(f"{file}: not a BERT config (it needs {', '.join(keys)})")
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: hidden_act {c['hidden_act']!r}, this model implements BERT's erf GELU only")
    return Config(vocab_size=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                  heads=c["num_attention_heads"], ffn=c["intermediate_size"],
                  max_positions=c["max_position_embeddings"], type_vocab=c.get("type_vocab_size", 2),
                  dropout=c.get("hidden_dropout_prob", 0.1), ln_eps=c.get("layer_norm_eps", 1e-12),
                  init_std=c.get("initializer_range", 0.02), **overrides)


def load_bert(model, path):
    """Copy a Hugging Face BERT checkpoint directory into `model`, asserting that every BERT
    parameter of ours is there with the right shape and that nothing in the file is left over.
    The visual modules (and the tag LayerNorm) stay as initialised."""
    st, binf = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        src = read_safetensors(st)
    elif os.path.exists(binf):
        try:
            src = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, not plain tensors
            first = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"{binf}: not a readable PyTorch weights file ({type(e).__name__}: {first})") from None
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this BERT directory")
    src = {hf_to_ours(k): v for k, v in src.items() if not HF_IGNORED.search(k)}
    ours = model.state_dict()
    bert_keys = {k for k in ours if not k.startswith(("embeddings.feat.", "embeddings.box.", "embeddings.tag_ln.",
                                                      "visual.", "mlm.decoder."))}
    missing, unexpected = bert_keys - src.keys(), src.keys() - bert_keys
    if "nsp.weight" in missing and "nsp.bias" in missing:  # a checkpoint without NSP head (BertForMaskedLM)
        missing -= {"nsp.weight", "nsp.bias"}
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match BERT's. missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    with torch.no_grad():
        for k, v in src.items():
            if ours[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(ours[k].shape)}")
            ours[k].copy_(v)
    return model

