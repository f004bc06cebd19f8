"""
Benchmark one pre-training step at the paper's shapes, and the data pipeline that feeds it.

    python bench.py --device cpu --batch-size 16 --text-len 32 --regions 36 --steps 6
    python bench.py --device cuda --dtype bf16 --compile --batch-size 144      # on a GPU: prints MFU
    python bench.py --compare-hf ...   # also time transformers' VisualBertForPreTraining, side by side
    python bench.py --steps 0 --batch-size 144 --workers 8                    # the data loader alone

BERT-base dimensions, 2048-d region features, one tag piece per region, an aligned batch (text +
tags + regions), forward + backward + optimiser step, warm-up steps left out. Tokens are
batch x (text + tags + regions). The last line is exactly `tokens/s: N` (unless --steps 0).
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import common
import data
import guards
import storage
from model import PEAK_FLOPS, PRESETS, Config, VisualBERT, peak_flops, train_flops

# -----------------------------------------------------------------------------
# settings: `python bench.py -h` is the manual
parser = guards.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the step runs: cpu, cuda, cuda:1, ... (default: cuda if there is one, here "
                         "%(default)s)")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype of the step, as pretrain.py's --dtype; fp16 with a GradScaler (%(default)s)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model first, as pretrain.py --compile")
parser.add_argument("--model", default="base", choices=sorted(PRESETS),
                    help="size preset of model.py (%(default)s: BERT-base, the paper's)")
parser.add_argument("--batch-size", type=guards.POSITIVE_INT, default=16, help="sequences in the step (%(default)s)")
parser.add_argument("--text-len", type=guards.POSITIVE_INT, default=32, help="text pieces per sequence (%(default)s)")
parser.add_argument("--regions", type=guards.POSITIVE_INT, default=36,
                    help="regions per image, each with one tag piece (%(default)s, the paper's fixed 36 boxes)")
parser.add_argument("--feat-dim", type=guards.POSITIVE_INT, default=2048,
                    help="size of a region's feature (%(default)s, bottom-up attention's)")
parser.add_argument("--steps", type=guards.COUNT, default=6,
                    help="timed steps (%(default)s; 0: time the data loader alone)")
parser.add_argument("--warmup", type=guards.COUNT, default=2, help="untimed steps first (%(default)s)")
parser.add_argument("--compare-hf", action="store_true",
                    help="time transformers' VisualBertForPreTraining too (eager, its defaults)")
parser.add_argument("--loader-images", type=guards.POSITIVE_INT, default=256,
                    help="images in the temporary feature store for the loader benchmark (%(default)s; 0: skip it)")
parser.add_argument("--workers", type=guards.COUNT, default=2,
                    help="DataLoader workers for the loader benchmark (%(default)s)")
parser.add_argument("--processes", type=guards.POSITIVE_INT, default=1, metavar="N",
                    help="the loader builds 1/N of each global batch, as each of N processes under torchrun does "
                         "(%(default)s)")


def aligned_batch(cfg, B, T, K, gen):
    """A masked aligned batch with random content, shaped as data.py makes them."""
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=gen)
    mlm = torch.where(torch.rand(B, T, generator=gen) < 0.15, ids, -100)
    tags = torch.randint(5, cfg.vocab_size, (B, K), generator=gen)
    boxes = torch.rand(B, K, 4, generator=gen)
    feats = torch.rand(B, K, cfg.feat_dim, generator=gen)
    masked = torch.rand(B, K, generator=gen) < 0.15
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.bool),
            "token_type_ids": torch.zeros_like(ids),
            "mlm_labels": mlm, "match_labels": torch.randint(0, 2, (B,), generator=gen),
            "tag_ids": tags, "tag_boxes": boxes, "tag_mask": torch.ones(B, K, dtype=torch.bool),
            "tag_labels": torch.where(masked, tags, -100), "feats": feats * ~masked[..., None], "boxes": boxes,
            "region_mask": torch.ones(B, K, dtype=torch.bool), "feat_targets": feats, "region_masked": masked,
            "obj_labels": torch.randint(0, cfg.num_labels, (B, K), generator=gen),
            "obj_conf": torch.rand(B, K, generator=gen)}


def time_steps(step, n_warmup, n_steps, device):
    for _ in range(n_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n_steps


def bench_ours(args, device, batch, cfg):
    """pretrain.py's training step (one process, one micro-batch): its optimiser, autocast, loss
    scaling (fp16), clip and compile."""
    model = VisualBERT(cfg).to(device)
    settings = argparse.Namespace(lr=1e-4, warmup=0.0, weight_decay=0.01)
    optimizer, _, scaler = common.make_optimizer(model.parameters(), settings, 1, device, args.dtype)
    loss = common.wrap(common.Loss(model.pretrain_loss, model), device, 1, args.compile)
    ctx = common.autocast(device, args.dtype)
    micro = common.micro_batches(batch, 1, device)
    _, counts = common.global_counts(model, micro)
    share = common.pretrain_share(counts)  # as pretrain.py's loop

    def step():
        common.train_step(loss, micro, share, optimizer, scaler, 1e-4, 1.0, ctx, 1)

    return time_steps(step, args.warmup, args.steps, device)


def bench_hf(args, device, batch, cfg):
    """transformers' VisualBERT at the same dimensions: its visual embeddings hold the tags and the
    regions (2K visual tokens of the feature size), its MLM head runs over every text position."""
    from transformers import VisualBertConfig, VisualBertForPreTraining
    hf_cfg = VisualBertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
                              visual_embedding_dim=cfg.feat_dim)
    hf_cfg._attn_implementation = "eager"
    model = VisualBertForPreTraining(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T, K = batch["input_ids"].shape[0], batch["input_ids"].shape[1], batch["feats"].shape[1]
    visual = torch.cat([batch["feats"], batch["feats"]], 1).to(device)  # (B, 2K, D): tags' and regions' slots
    labels = torch.cat([batch["mlm_labels"], torch.full((B, 2 * K), -100)], 1).to(device)
    inputs = dict(input_ids=batch["input_ids"].to(device),
                  attention_mask=torch.ones(B, T, dtype=torch.long, device=device),
                  visual_embeds=visual, visual_attention_mask=torch.ones(B, 2 * K, dtype=torch.long, device=device),
                  labels=labels, sentence_image_labels=batch["match_labels"].to(device))

    def step():
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, args.warmup, args.steps, device)


def bench_loader(args, cfg):
    """Samples/s that data.batches delivers with `--workers` processes: aligned batches read from a
    feature store on disk (small enough to sit in the page cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = np.random.default_rng(0)
        w = storage.FeatureWriter(os.path.join(tmp, "store"), args.feat_dim,
                                  [f"class{i}" for i in range(cfg.num_labels)], shard_size=128)
        for i in range(args.loader_images):
            w.add(f"im{i}", r.random((args.regions, args.feat_dim), dtype=np.float32),
                  np.sort(r.random((args.regions, 4)), 1),
                  r.integers(0, cfg.num_labels, args.regions), r.random(args.regions), 640, 480)
        w.close()
        vocab = data.Vocab(list(data.Vocab.RESERVED) + [f"w{i}" for i in range(cfg.vocab_size - 5)])
        words = lambda n: " ".join(f"w{j}" for j in r.integers(0, cfg.vocab_size - 5, n))
        with open(os.path.join(tmp, "pairs.jsonl"), "w") as f:
            for i in range(args.loader_images):
                f.write(f'{{"image_id": "im{i}", "caption": "{words(args.text_len - 2)}"}}\n')
        captions = storage.TokenCorpus(os.path.join(tmp, "pairs.jsonl"), vocab, "pairs", os.path.join(tmp, "cache"))
        images = data.Images([os.path.join(tmp, "store")])
        corpus = data.Corpus("pairs", "pair", vocab, (captions, captions.image_ids), images)
        ds = data.PretrainData([corpus], args.batch_size, seed=0, rank=0, world=args.processes)  # this process's rows
        n = max(16, 8 * args.loader_images // args.batch_size)
        # as pretrain.py
        it = data.batches(ds, range(n), args.workers, pin_memory=torch.device(args.device).type == "cuda")
        next(it)  # workers started
        t0 = time.perf_counter()
        count = sum(next(it)[1]["input_ids"].shape[0] for _ in range(n - 1))
        return count / (time.perf_counter() - t0)


def main(argv=None):
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = Config(**{**PRESETS[args.model], "feat_dim": args.feat_dim, "num_labels": 1600})  # the preset's own dropout
    B, T, K = args.batch_size, args.text_len, args.regions
    batch = aligned_batch(cfg, B, T, K, torch.Generator().manual_seed(0))
    tokens = B * (T + K + K)  # text + one tag piece per region + regions
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, "
          f"dtype {args.dtype}, compile {args.compile}; model {args.model}, batch {B}, text {T} + tags {K} + regions "
          f"{K} = {T + 2 * K} tokens")
    flops = train_flops(cfg, B, T + 2 * K,
                        int((batch["mlm_labels"] != -100).sum() + (batch["tag_labels"] != -100).sum()))
    peak = peak_flops(device, args.dtype)

    if args.loader_images:
        loader_rate = bench_loader(args, cfg)
        print(f"loader: {loader_rate:.0f} samples/s from a feature store ({args.workers} workers, {args.regions} x "
              f"{args.feat_dim} features) in one process, which builds {B // args.processes} rows of each global "
              f"batch of {B} (--processes {args.processes})")
        h100 = 0.45 * PEAK_FLOPS["H100"][0] / (flops / B)  # samples/s an H100 trains on at the 45% MFU target, bf16
        print(f"loader: an H100 at 45% MFU consumes about {h100:.0f} samples/s at these shapes; one process's loader "
              f"gives {loader_rate / h100:.2f}x that")
    if args.steps == 0:
        return
    if args.compare_hf:
        dt_hf = bench_hf(args, device, batch, cfg)
        print(f"transformers VisualBertForPreTraining (eager, fp32): {dt_hf * 1000:.0f} ms/step, "
              f"{tokens / dt_hf:.0f} tokens/s")
    dt = bench_ours(args, device, batch, cfg)
    mfu = f"{flops / dt / peak:.1%}" if peak else "n/a (unknown peak for this device)"
    print(f"ours: {dt * 1000:.0f} ms/step, {B / dt:.1f} samples/s, MFU {mfu}")
    if args.compare_hf:
        print(f"speed-up over transformers: {dt_hf / dt:.2f}x")
    print(f"tokens/s: {tokens / dt:.0f}")


if __name__ == "__main__":
    main()
