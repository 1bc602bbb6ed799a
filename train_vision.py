"""
Stage 1: vision pretraining. The SigLIP2 ViT learns to see from image-text records, before any LLM reads it.

    python train_vision.py                                  # CPU or one GPU: the small preset's ViT, from scratch
    python train_vision.py --init_from=google/siglip2-so400m-patch14-384 --model_preset=nanomolmo2   # continue one
    torchrun --nproc_per_node=4 train_vision.py --batch_size=64
    then: python train_align.py --vit_from=out/vision  ->  python train_joint.py --init_from=out/align

Why a stage of its own: trained from scratch inside Molmo2, the ViT gets gradient only through a few answer
tokens read by an LLM that is itself untrained, so neither side can improve first (BENCHMARKS.md: such runs
never looked at their images). Here the ViT gets a dense signal of its own, and the later stages start from
features that already say what is where.

Design choices (after SigLIP2, which combines a sigmoid image-text loss with the LocCa decoder's dense losses):
- The ViT sees exactly what Molmo2 gives it: the processor's crops (a global view and overlapping tiles), and
  the features the connector will read (blocks config.connector.vit_layers, concatenated), mean-pooled over
  the same 2x2 windows as the connector's pooling. A small head maps each pooled token to an embedding.
- Sigmoid image-text loss (SigLIP): the mean of an image's tokens, projected, against a caption encoded by a
  small text tower (the ViT's own blocks, bidirectional, over Qwen3's token ids hashed into a small table);
  every (image, caption) pair of the micro-batch is a binary problem, logit = exp(t) * cos + b with a learned
  temperature t (from log 10) and bias b (from -10), as in the paper. Two images with the same caption text are
  both positives.
- Localisation loss (in the spirit of LocCa): for every pointed object label of an image ("red circles"), each
  pooled token says whether a point of that label lies in its cell, as a sigmoid of the cosine between the
  token's embedding and the label's text embedding (learned scale and bias); and where one does, the token
  predicts where in its cell. Points come from the <points> tags of any record's answers, so the synthetic
  world, PixMo-Points and CoSyn-Point feed it alike. A label is compared only with the tokens of its own image
  (another image may hold that label unannotated).
- Only single-image records with a caption or points train; others are skipped and counted.
- The heads and the text tower are thrown away: final/ holds the ViT alone, in transformers' SiglipVisionModel
  layout, and the validation line reads counts and points straight off the localisation head (no LLM).
"""

import collections
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure
from training import Dist, _DrawKeys, full_state_dicts, lr_at, resume_run, save_checkpoint, seed_everything

# -- knobs (override with config/*.py files and --key=value) -------------------------------------------------
out_dir = "out/vision"
init_from = "scratch"  # scratch (the ViT of model_preset) | a SigLIP checkpoint dir or hub id | a stage-1 out_dir
model_preset = "small"  # the Molmo2Config preset whose ViT (and connector layers) it trains: tiny | small | nanomolmo2
data_dir = "data"
data_mixture = {"image": (1.0, ["synth_image"])}
max_crops = 4  # crops per image (Molmo2: 8 in training), as the later stages will see them
overlap_margins = (2, 2)
sigmoid_weight = 1.0  # SigLIP's image-caption loss; 0 = off
loc_weight = 1.0  # the localisation loss (which token holds a point of which label, and where); 0 = off
text_layers = 2  # blocks of the text tower (as wide as the ViT)
text_max_len = 96  # caption tokens kept
text_vocab_rows = 16384  # the text tower's token table: Qwen3 id % rows (a small table; 151,936 rows and their
#   AdamW state were most of a CPU step's optimizer time and of the checkpoint, for ~500 tokens in use)
embed_dim = 128  # width of the token, image and text embeddings the losses compare
batch_size = 32  # images per micro-batch per process
grad_accum = 1
loader_workers = 0  # processes that make the next step's images while this one trains (Linux); 0 = in this process
max_steps = 600
lr = 1e-3  # AdamW peak for every trained weight (ViT, heads, text tower)
warmup = 50
weight_decay = 0.05  # on matrices only; norms, biases, position and token embeddings are not decayed
grad_clip = 1.0
device = "auto"  # auto | cpu | cuda
dtype = "bfloat16"  # autocast dtype on GPU; CPU runs are float32
parallel = "ddp"  # ddp | fsdp (with torchrun)
log_every = 10
eval_every = 100  # validation: losses and the head's counting / pointing on val images
eval_batches = 4
save_every = 100  # steps between resumable checkpoints
seed = 1337
resume = True  # continue from out_dir/ckpt.pt if it exists
config = configure(globals()) if __name__ == "__main__" else None  # (tests import the pieces below)
# ------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The model: the ViT, a head on its pooled tokens, a text tower, and the two losses
# ---------------------------------------------------------------------------


def sigmoid_loss(image_emb, text_emb, log_temperature, bias, positives):
    """SigLIP's loss. image_emb (B, E), text_emb (B, E) unit vectors; positives (B, B) bool (the diagonal, and
    any pair whose captions are the same text). -> sum over all B x B pairs of -log sigmoid(+-logit), / B."""
    logits = image_emb @ text_emb.T * log_temperature.exp() + bias  # (B, B)
    signs = positives.to(logits.dtype) * 2 - 1  # +1 for a matching pair, -1 otherwise
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


class TextTower(nn.Module):
    """Qwen3 token ids -> one embedding per text: token + position embeddings, bidirectional ViT-style blocks over
    the real tokens, a final LayerNorm, the mean over the real tokens, a Linear."""

    def __init__(self, vit_config, n_layers, max_len, embed_dim, vocab_rows):
        super().__init__()
        from vision import Block
        width = vit_config.hidden_size
        self.vocab_rows = vocab_rows
        self.token_embedding = nn.Embedding(vocab_rows, width)  # id % rows: hashed, a few ids share a row
        self.position_embedding = nn.Parameter(torch.zeros(max_len, width))
        self.layers = nn.ModuleList([Block(vit_config) for _ in range(n_layers)])
        self.final_layer_norm = nn.LayerNorm(width, eps=vit_config.layer_norm_eps)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, ids, lengths):
        """ids (T, L) long, padded; lengths (T,) -> (T, E) unit vectors."""
        T, L = ids.shape
        real = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]  # (T, L)
        x = self.token_embedding(ids % self.vocab_rows) + self.position_embedding[:L]  # (T, L, C)
        for block in self.layers:
            x = block(x, real[:, None, None, :])  # (T, L, C): padding is never attended to
        x = self.final_layer_norm(x)
        pooled = (x * real[..., None]).sum(1) / lengths[:, None].clamp(min=1)  # (T, C)
        return F.normalize(self.head(pooled).float(), dim=-1)  # (T, E)


class VisionPretrainer(nn.Module):
    """The ViT and what stage 1 trains on top of it. forward(batch) -> {loss name: scalar}."""

    def __init__(self, vit, vit_layers, text_layers, text_max_len, embed_dim, use_sigmoid, use_loc,
                 text_vocab_rows=16384):
        super().__init__()
        self.vit, self.vit_layers = vit, tuple(vit_layers)
        width = vit.config.hidden_size * len(self.vit_layers)
        self.token_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim * 2), nn.GELU(),
                                        nn.Linear(embed_dim * 2, embed_dim))
        self.text = TextTower(vit.config, text_layers, text_max_len, embed_dim, text_vocab_rows)
        self.use_sigmoid, self.use_loc = use_sigmoid, use_loc
        if use_sigmoid:  # SigLIP's start: t = log 10, b = -10 (the paper's, for its many negatives per positive)
            self.image_proj = nn.Linear(embed_dim, embed_dim)
            # (1,), not 0-dim: fully_shard takes no 0-dim parameter
            self.log_temperature = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.bias = nn.Parameter(torch.full((1,), -10.0))
        if use_loc:  # a few positive tokens per label among dozens: start near that prior
            self.offset_head = nn.Linear(embed_dim, 2)
            self.loc_log_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.loc_bias = nn.Parameter(torch.full((1,), -3.0))
        self.init_new()

    def init_new(self):
        """Everything but the ViT (which keeps its own init or pretrained weights)."""
        for module in [self.token_head, self.text] + ([self.image_proj] if self.use_sigmoid else []) + \
                ([self.offset_head] if self.use_loc else []):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding, std=0.02)

    def token_embeddings(self, patches, pooling):
        """patches (N, P, patch_dim), pooling (M, K) indices into the N * P patches (-1 = none) -> (M, E)."""
        features = torch.cat(self.vit(patches, list(self.vit_layers)), dim=-1)  # (N, P, D)
        features = features.reshape(-1, features.shape[-1])  # (N * P, D)
        valid = (pooling >= 0)[..., None].to(features.dtype)  # (M, K, 1)
        windows = features[pooling.clamp(min=0)] * valid  # (M, K, D)
        pooled = windows.sum(1) / valid.sum(1).clamp(min=1)  # (M, D): the mean of the window
        return self.token_head(pooled)  # (M, E)

    def forward(self, batch):
        return self.losses(self.token_embeddings(batch["patches"], batch["pooling"]), batch)

    def losses(self, tokens, batch):
        """tokens (M, E) from token_embeddings -> {loss name: scalar} for the objectives that are on."""
        losses = {}
        if self.use_sigmoid:
            losses["sigmoid"] = self.caption_loss(tokens, batch)
        if self.use_loc:
            losses["loc"], losses["offset"] = self.loc_loss(tokens, batch)
        return losses

    def caption_loss(self, tokens, batch):
        captioned = batch["caption_image"]  # (B',) the images that have a caption
        n_images = int(batch["token_image"].max()) + 1
        per_image = torch.zeros(n_images, tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
        per_image.index_add_(0, batch["token_image"], tokens)  # (n_images, E)
        per_image = per_image / torch.bincount(batch["token_image"], minlength=n_images)[:, None].to(tokens.dtype)
        image_emb = F.normalize(self.image_proj(per_image[captioned]).float(), dim=-1)  # (B', E)
        if len(captioned) == 0:  # nothing to compare; keep every weight in the graph (DDP)
            stand_in = self.text(*self.one_token(tokens))  # the tower runs on every rank (FSDP gathers its blocks)
            return 0.0 * (image_emb.sum() + self.log_temperature + self.bias + stand_in.sum()).sum()
        text_emb = self.text(batch["caption_ids"], batch["caption_lengths"])  # (B', E)
        return sigmoid_loss(image_emb, text_emb, self.log_temperature, self.bias, batch["caption_same"])

    @staticmethod
    def one_token(like):
        """A stand-in text of one token id 0: (ids (1, 1), lengths (1,))."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=like.device)
        return ids, torch.ones(1, dtype=torch.long, device=like.device)

    def loc_logits(self, tokens, batch):
        """-> (M, n_labels) logits: does token m hold a point of label j (only meaningful where the token's
        image is the label's)."""
        label_emb = self.text(batch["label_ids"], batch["label_lengths"])  # (n_labels, E)
        return F.normalize(tokens.float(), dim=-1) @ label_emb.T * self.loc_log_scale.exp() + self.loc_bias

    def loc_loss(self, tokens, batch):
        if batch["label_ids"].shape[0] == 0:  # no pointed labels in this micro-batch; keep the graph whole (DDP)
            stand_in = self.text(*self.one_token(tokens))  # the tower runs on every rank (FSDP gathers its blocks)
            zero = 0.0 * (tokens.sum() + self.offset_head.weight.sum() + self.offset_head.bias.sum()
                          + self.loc_log_scale + self.loc_bias + stand_in.sum()).sum()
            return zero, zero
        logits = self.loc_logits(tokens, batch)  # (M, n_labels)
        same_image = batch["token_image"][:, None] == batch["label_image"][None, :]  # (M, n_labels)
        bce = F.binary_cross_entropy_with_logits(logits, batch["loc_targets"], reduction="none")
        loc = (bce * same_image).sum() / same_image.sum()
        # where a token holds a point: its position in the token's cell, each coordinate in [0, 1]
        holds = batch["offset_targets"][:, 0] >= 0  # (M,)
        predicted = torch.sigmoid(self.offset_head(tokens).float())  # (M, 2)
        offset = F.l1_loss(predicted[holds], batch["offset_targets"][holds], reduction="sum") / holds.sum().clamp(min=1)
        return loc, offset


# ---------------------------------------------------------------------------
# Data: records -> crops, pooling windows, captions, pointed labels and their per-token targets
# ---------------------------------------------------------------------------

CAPTION_STYLES = ("long_caption", "short_caption", "transcript")


def token_cells(height, width, grid, processor):
    """The cell of every pooled token of one image, as (M, 4) [x0, y0, x1, y1] in [0, 1] of the image, in the
    processor's token order: the global view's tokens, then the stitched high-res grid's. Each view's cells
    tile the image, so a point lies in exactly one cell of each view."""
    import data
    rows, cols, canvas_h, canvas_w = data.crop_geometry(height, width, processor.max_crops, processor.crop_size,
                                                        processor.patch_size, processor.overlap_margins)
    n, ps = processor.crop_size // processor.patch_size, processor.patch_size
    stride = (n - sum(processor.overlap_margins)) * ps
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (n, n) patch row, column
    boxes = [np.stack([c / n, r / n, (c + 1) / n, (r + 1) / n], -1).reshape(-1, 4)]  # the global crop
    for k in range(rows * cols):  # the tiles of the canvas, row-major
        y0, x0 = (k // cols) * stride + r * ps, (k % cols) * stride + c * ps  # (n, n) px on the canvas
        box = [x0 / canvas_w, y0 / canvas_h, (x0 + ps) / canvas_w, (y0 + ps) / canvas_h]
        boxes.append(np.stack(box, -1).reshape(-1, 4))
    boxes = np.concatenate(boxes)  # (n_crops * n * n, 4): every patch's box
    pooling = data._image_pooling(rows, cols, n, tuple(processor.overlap_margins), tuple(processor.image_pooling))[0]
    assert pooling.shape[0] == grid[0] * grid[1] + grid[2] * grid[3]
    slots = boxes[np.maximum(pooling, 0)]  # (M, K, 4)
    valid = (pooling >= 0)[..., None]
    lo = np.where(valid, slots[..., :2], np.inf).min(1)  # (M, 2)
    hi = np.where(valid, slots[..., 2:], -np.inf).max(1)  # (M, 2)
    return np.concatenate([lo, hi], -1)  # (M, 4)


def cell_targets(points, cells):
    """points (n, 2) in [0, 1], cells (M, 4) -> (holds (M,) bool, offsets (M, 2) in [0, 1] of the cell, -1 where
    no point). A point on a shared edge belongs to the cell after it (half-open cells), one on the image's far
    edge to the last cell; two points in one cell give the first one's offset."""
    holds = np.zeros(len(cells), dtype=bool)
    offsets = np.full((len(cells), 2), -1.0, dtype=np.float32)
    for x, y in points:
        inside = ((cells[:, 0] <= x) & ((x < cells[:, 2]) | (cells[:, 2] >= 1.0))
                  & (cells[:, 1] <= y) & ((y < cells[:, 3]) | (cells[:, 3] >= 1.0)))
        for m in np.flatnonzero(inside & ~holds):
            x0, y0, x1, y1 = cells[m]
            offsets[m] = ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0))
        holds |= inside
    return holds, offsets


def pointed_labels(record):
    """{label: [(x, y), ...]} from every <points> tag in the record's answers (image 1, normalised coordinates),
    the points of a label merged over annotations without repeats, in first-seen order."""
    import data
    labels = {}
    for annotation in record["annotations"]:
        for message in annotation["messages"]:
            if message["role"] != "assistant":
                continue
            for tag in data.parse_points(message["content"]).tags:
                if tag.kind != "points" or not tag.label:
                    continue
                seen = labels.setdefault(tag.label, [])
                for p in tag.points:
                    if (p.x, p.y) not in seen:
                        seen.append((p.x, p.y))
    return {label: points for label, points in labels.items() if points}


def caption_of(record, draw):
    """One caption of the record (an answer of a caption style), chosen by the draw number, or None."""
    captions = [a["messages"][-1]["content"] for a in record["annotations"] if a["style"] in CAPTION_STYLES]
    return captions[draw % len(captions)] if captions else None


def to_uint8(patches):
    """Crops in [-1, 1] -> the whole 0..255 values they were made from (the processor rounds after resizing), a
    quarter of the bytes to send from a worker, keep in a batch and copy to the GPU; from_uint8 undoes it exactly."""
    return patches.mul(127.5).add_(127.5).round_().to(torch.uint8)


def from_uint8(patches):
    """The inverse of to_uint8, with the processor's own float32 steps (x - 127.5) / 127.5: bit for bit its output."""
    return patches.float().sub_(127.5).div_(127.5)


class VisionExample:
    """One image's crops and targets (everything a batch needs, on CPU)."""

    def __init__(self, record, draw, processor, text_max_len, use_sigmoid, use_loc):
        tokenizer = processor.tokenizer
        image = record["images"][0]
        vision = processor.image(image)
        self.patches, self.pooling = to_uint8(vision.patches), vision.token_pooling
        self.grid = vision.grid
        self.caption = caption_of(record, draw) if use_sigmoid else None
        self.caption_ids = None
        if self.caption is not None:
            self.caption_ids = tokenizer.encode(self.caption, allow_special=False)[:text_max_len]
        self.labels, self.label_ids, self.points = [], [], []
        self.cells = token_cells(image.height, image.width, vision.grid, processor)
        if use_loc:
            for label, points in pointed_labels(record).items():
                self.labels.append(label)
                self.label_ids.append(tokenizer.encode(label, allow_special=False)[:text_max_len])
                self.points.append(np.array(points, dtype=np.float64))

    @property
    def trains(self):
        return self.caption is not None or bool(self.labels)


def collate_vision(examples):
    """VisionExamples -> the batch dict VisionPretrainer.forward reads (CPU tensors)."""
    patches, pooling, token_image, offset = [], [], [], 0
    for i, ex in enumerate(examples):
        patches.append(ex.patches)
        pooling.append(torch.where(ex.pooling >= 0, ex.pooling.long() + offset, -1))
        token_image.append(torch.full((ex.pooling.shape[0],), i))
        offset += ex.patches.shape[0] * ex.patches.shape[1]
    M = sum(p.shape[0] for p in pooling)
    token_start = np.cumsum([0] + [ex.pooling.shape[0] for ex in examples])
    captioned = [i for i, ex in enumerate(examples) if ex.caption is not None]
    captions = [examples[i].caption for i in captioned]
    labels = [(i, ids, pts) for i, ex in enumerate(examples) for ids, pts in zip(ex.label_ids, ex.points)]
    loc_targets = torch.zeros(M, len(labels))
    offset_targets = torch.full((M, 2), -1.0)
    for j, (i, _, pts) in enumerate(labels):
        holds, offsets = cell_targets(pts, examples[i].cells)
        rows = token_start[i] + np.flatnonzero(holds)
        loc_targets[rows, j] = 1.0
        offset_targets[rows] = torch.from_numpy(offsets[holds])
    batch = {"patches": torch.cat(patches), "pooling": torch.cat(pooling), "token_image": torch.cat(token_image),
             "caption_image": torch.tensor(captioned, dtype=torch.long),
             "caption_same": torch.tensor([[a == b for b in captions] for a in captions],
                                          dtype=torch.bool).reshape(len(captions), len(captions)),
             "label_image": torch.tensor([i for i, _, _ in labels], dtype=torch.long),
             "loc_targets": loc_targets, "offset_targets": offset_targets,
             # for the read-out: every token's cell, whether it is of the high-res view, each label's points
             "cells": torch.from_numpy(np.concatenate([ex.cells for ex in examples])).float(),
             "high_res": torch.cat([torch.arange(ex.pooling.shape[0]) >= ex.grid[0] * ex.grid[1] for ex in examples]),
             "label_points": [pts for _, _, pts in labels]}
    texts_by_name = {"caption": [examples[i].caption_ids for i in captioned], "label": [ids for _, ids, _ in labels]}
    for name, texts in texts_by_name.items():
        lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
        ids = torch.zeros(len(texts), max([len(t) for t in texts], default=1), dtype=torch.long)
        for k, t in enumerate(texts):
            ids[k, :len(t)] = torch.tensor(t, dtype=torch.long)
        batch[f"{name}_ids"], batch[f"{name}_lengths"] = ids, lengths
    return batch


_WORKER_LOADER = None  # in a worker process: the VisionLoader it was forked from


def _init_worker(loader):
    global _WORKER_LOADER
    _WORKER_LOADER = loader
    torch.set_num_threads(1)  # a forked child's first multi-threaded torch op can hang (OpenMP is not fork-safe)


def _worker_example(key):
    """In a worker: (the example of a key or None, what making it counted)."""
    loader = _WORKER_LOADER
    report = loader.report
    report.n_seen, report.counts, report.first = 0, collections.Counter(), {}
    loader.not_used = dict.fromkeys(loader.not_used, 0)
    example = loader.example(key)
    if example is not None:  # numpy goes back by value through the pipe; tensors would each need shared memory
        example.patches, example.pooling = example.patches.numpy(), example.pooling.numpy()
    return example, (report.n_seen, dict(report.counts), dict(report.first), dict(loader.not_used))


class VisionLoader:
    """Micro-batches of images for one rank, drawn from the mixture like the other stages' (one stream of draws
    dealt over world_size * grad_accum shards, so the examples of a step depend only on their product) and
    resumable through the sampler states. Records that cannot train here are skipped and counted.
    workers > 0: forked worker processes (Linux) make the next step's examples while this step trains. An
    example is a pure function of its key and keys are drawn here in order, so the batches are the serial
    loader's; state_dict() is the state before the keys read ahead."""

    def __init__(self, data_dir, mixture, split, batch_size, processor, text_max_len, use_sigmoid, use_loc, seed,
                 rank=0, world_size=1, grad_accum=1, workers=0):
        import data
        self.batch_size, self.processor, self.text_max_len = batch_size, processor, text_max_len
        self.use_sigmoid, self.use_loc = use_sigmoid, use_loc
        self.report = data.SkipReport()
        self.not_used = {"not a single image": 0, "no caption or points": 0}
        self.shards = []
        for shard in range(rank * grad_accum, (rank + 1) * grad_accum):
            try:
                sampler, self.files = data.open_mixture(mixture, data_dir, split, seed, rank=0, report=self.report)
            except FileNotFoundError as e:  # no data yet: the message says how to make it
                raise SystemExit(str(e)) from None
            self.shards.append(_DrawKeys(sampler, shard, world_size * grad_accum))
        self.workers, self.pool, self.ahead = workers, None, None  # ahead: (states before, [(keys, result)])

    def example(self, key):
        import data
        name, index, draw = key
        record = self.files[name].get(index)
        if record is None:
            return None  # counted in self.report
        if len(record.get("images", [])) != 1:
            self.not_used["not a single image"] += 1
            return None
        try:
            ex = VisionExample(record, draw, self.processor, self.text_max_len, self.use_sigmoid, self.use_loc)
        except data.MediaError as e:
            self.report.skip(data.BadRecord("undecodable_image", str(e)))
            return None
        if not ex.trains:
            self.not_used["no caption or points"] += 1
            return None
        return ex

    def _count(self, counted):
        n_seen, counts, first, not_used = counted
        self.report.n_seen += n_seen
        self.report.counts.update(counts)
        for reason, message in first.items():
            self.report.first.setdefault(reason, message)
        for why, n in not_used.items():
            self.not_used[why] += n

    def _read_ahead(self):
        states = [keys.state_dict() for keys in self.shards]
        started = []
        for keys in self.shards:
            drawn = [next(keys) for _ in range(self.batch_size)]
            started.append((drawn, self.pool.map_async(_worker_example, drawn)))
        self.ahead = (states, started)

    def next_step(self):
        """-> [micro-batch] (grad_accum of them), each collated from batch_size images."""
        if self.workers and self.pool is None:
            import atexit
            import multiprocessing
            self.pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, (self,))
            atexit.register(self.close)
        if self.pool is not None and self.ahead is None:
            self._read_ahead()
        batches = []
        for s, keys in enumerate(self.shards):
            examples = []
            if self.ahead is not None:
                for ex, counted in self.ahead[1][s][1].get():
                    self._count(counted)
                    if ex is not None:
                        ex.patches, ex.pooling = torch.from_numpy(ex.patches), torch.from_numpy(ex.pooling)
                        examples.append(ex)
            misses = 0
            while len(examples) < self.batch_size:  # serially, or to replace the read-ahead's unusable records
                ex = self.example(next(keys))
                if ex is not None:
                    examples.append(ex)
                    misses = 0
                elif (misses := misses + 1) >= 1000:
                    raise RuntimeError(f"stage 1: 1000 records in a row unusable\n{self.summary()}")
            batches.append(collate_vision(examples))
        self.ahead = None
        if self.pool is not None:
            self._read_ahead()  # the next step's examples, made while this one trains
        return batches

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def summary(self):
        lines = [self.report.summary()]
        lines += [f"records not used by this stage ({why}): {n}" for why, n in self.not_used.items() if n]
        return "\n".join(lines)

    def state_dict(self):
        samplers = self.ahead[0] if self.ahead is not None else [keys.state_dict() for keys in self.shards]
        return {"samplers": samplers, "n_seen": self.report.n_seen, "counts": dict(self.report.counts),
                "first": dict(self.report.first), "not_used": dict(self.not_used)}

    def load_state_dict(self, state):
        if len(state["samplers"]) != len(self.shards):
            raise ValueError(f"data state for {len(state['samplers'])} micro-batches per step, this run has "
                             f"{len(self.shards)} (resume with the same grad_accum)")
        self.ahead = None  # what was read ahead is dropped
        for keys, sampler_state in zip(self.shards, state["samplers"]):
            keys.load_state_dict(sampler_state)
        self.report.n_seen, self.report.first = state["n_seen"], dict(state["first"])
        self.report.counts = collections.Counter(state["counts"])
        self.not_used = dict(state["not_used"])


# ---------------------------------------------------------------------------
# Validation: the losses, and counting / pointing read straight off the localisation head
# ---------------------------------------------------------------------------


def read_out_points(probs, offsets, cells, threshold=0.5):
    """One label of one image: the high-res view's tokens whose probability passes the threshold -> (n, 2)
    points in [0, 1], each its cell's corner plus the predicted offset."""
    keep = probs > threshold
    return cells[keep, :2] + offsets[keep] * (cells[keep, 2:] - cells[keep, :2])


def to_device(batch, device):
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["patches"] = from_uint8(batch["patches"])  # on the device: a quarter of the bytes cross
    return batch


@torch.no_grad()
def validate(pretrainer, loader, d, n_batches, autocast, point_radius=0.05):
    """-> {loss name: mean}, plus, where the localisation loss is on, 'count_acc' (the high-res tokens that pass
    0.5 count the label's points exactly) and 'point_f1' (those tokens' points against the true ones, a hit
    within point_radius of the image side), over every pointed label of the first n_batches batches of val.
    The loader should be a fresh one, so every validation sees the same images."""
    from eval import point_scores
    was_training = pretrainer.training
    pretrainer.eval()
    if hasattr(pretrainer, "unshard"):  # FSDP: the root's own weights, gathered as its forward would
        pretrainer.unshard()
    sums, n, hits, f1s = {}, 0, [], []
    for _ in range(n_batches):
        batch = to_device(loader.next_step()[0], d.device)
        with autocast:
            tokens = pretrainer.token_embeddings(batch["patches"], batch["pooling"])
            losses = pretrainer.losses(tokens, batch)
            if pretrainer.use_loc:
                if batch["label_ids"].shape[0]:
                    probs = torch.sigmoid(pretrainer.loc_logits(tokens, batch)).float().cpu().numpy()  # (M, labels)
                    offsets = torch.sigmoid(pretrainer.offset_head(tokens).float()).cpu().numpy()  # (M, 2)
                else:  # FSDP: the text tower's blocks gather on every rank as often as on the others
                    pretrainer.text(*pretrainer.one_token(tokens))
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        if pretrainer.use_loc and batch["label_ids"].shape[0]:
            token_image, high_res = batch["token_image"].cpu().numpy(), batch["high_res"].cpu().numpy()
            cells = batch["cells"].cpu().numpy()
            for j, i in enumerate(batch["label_image"].cpu().numpy()):
                rows = np.flatnonzero((token_image == i) & high_res)
                pred = read_out_points(probs[rows, j], offsets[rows], cells[rows])
                true = batch["label_points"][j]
                hits.append(len(pred) == len(true))
                f1s.append(point_scores(pred, true, radius=point_radius)["f1"])
    if hasattr(pretrainer, "reshard"):
        pretrainer.reshard()
    pretrainer.train(was_training)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if hits:
        out["count_acc"], out["point_f1"] = float(np.mean(hits)), float(np.mean(f1s))
    return out


# ---------------------------------------------------------------------------
# Optimizer, export
# ---------------------------------------------------------------------------


def build_optimizer(module, lr, weight_decay, fused=None):
    """AdamW (0.9, 0.95, eps 1e-6) in two groups: matrices decay; norm gains, biases, embedding tables and the
    scalars (temperatures, biases of the losses) do not: decaying them pulls norms and embeddings toward 0
    for no gain."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        plain = p.dim() < 2 or name in ("vit.positional_embedding", "text.token_embedding.weight",
                                        "text.position_embedding")  # tables; patch_embedding is a matrix
        (no_decay if plain else decay).append(p)
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-6, fused=fused)


def export_vit(train_model, pretrainer, optimizer, d, final_dir):
    """final/: the ViT alone in SiglipVisionModel layout (under DDP/FSDP gathered, written by rank 0)."""
    from vision import SigLIP2
    if d.world_size > 1:
        state, _ = full_state_dicts(train_model, optimizer)
        if d.is_master:
            vit = SigLIP2(pretrainer.vit.config)
            vit.load_state_dict({k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")})
            vit.save_pretrained(final_dir)
        d.barrier()
    elif d.is_master:
        pretrainer.vit.save_pretrained(final_dir)


def build_vit(init_from, model_preset):
    """-> (the ViT to train, the blocks the connector will read): model_preset's ViT, fresh or loaded from a
    checkpoint of the same shape (a stage-1 out_dir, a SiglipVisionModel dir, a hub id)."""
    from model import Molmo2Config
    from training import load_vit
    config = Molmo2Config.preset(model_preset)  # resolves the connector's layers and trims the ViT after them
    if init_from == "scratch":
        from vision import SigLIP2
        return SigLIP2(config.vit), config.connector.vit_layers
    return load_vit(init_from, config.vit), config.connector.vit_layers


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def main():
    import json

    import data
    from eval import plot_curves, python_command
    if sigmoid_weight <= 0 and loc_weight <= 0:
        raise SystemExit("train_vision: sigmoid_weight and loc_weight are both 0: nothing to train")
    d = Dist(device)
    d.limit_cpu_threads(loader_workers)
    seed_everything(seed)  # the same initial weights on every rank
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    vit, vit_layers = build_vit(init_from, model_preset)
    pretrainer = VisionPretrainer(vit, vit_layers, text_layers, text_max_len, embed_dim,
                                  sigmoid_weight > 0, loc_weight > 0, text_vocab_rows).to(d.device)
    if d.world_size == 1:
        train_model = pretrainer
    elif parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        for block in list(pretrainer.vit.layers) + list(pretrainer.text.layers):
            fully_shard(block, **({"mp_policy": mp} if d.device.type == "cuda" else {}))
        train_model = fully_shard(pretrainer, **({"mp_policy": mp} if d.device.type == "cuda" else {}))
    elif parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(pretrainer, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    else:
        raise ValueError(f"parallel={parallel!r}: expected 'ddp' or 'fsdp'")
    optimizer = build_optimizer(pretrainer, lr, weight_decay)
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype)) if d.device.type == "cuda" else nullcontext()
    processor = data.Molmo2Processor(max_crops=max_crops, crop_size=vit.config.image_size,
                                     patch_size=vit.config.patch_size, overlap_margins=overlap_margins)
    loader_args = dict(data_dir=data_dir, mixture=data_mixture, batch_size=batch_size, processor=processor,
                       text_max_len=text_max_len, use_sigmoid=sigmoid_weight > 0, use_loc=loc_weight > 0, seed=seed)
    loader = VisionLoader(split="train", rank=d.rank, world_size=d.world_size, grad_accum=grad_accum,
                          workers=loader_workers, **loader_args)
    start_step = resume_run(ckpt_path, train_model, optimizer, loader, d) if resume else 0
    log_path = os.path.join(out_dir, "log.jsonl")
    if d.is_master:
        os.makedirs(out_dir, exist_ok=True)
    n_vit = sum(p.numel() for p in pretrainer.vit.parameters())
    n_rest = sum(p.numel() for p in pretrainer.parameters()) - n_vit
    d.print(f"stage 1 | ViT {n_vit / 1e6:.1f}M ({model_preset}, blocks {list(vit_layers)} read), heads and text tower "
            f"{n_rest / 1e6:.1f}M (thrown away after) | losses: sigmoid x {sigmoid_weight}, "
            f"localisation x {loc_weight} "
            f"| {d.world_size} process(es) on {d.device.type} | {batch_size * grad_accum * d.world_size} images a step")

    t_start = t_last = time.time()
    step_times = []
    for step in range(start_step, max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, max_steps)
        data_state = loader.state_dict()  # before this step's draws, in case the step must be redone
        micro_batches = loader.next_step()
        parts = {}
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            no_sync = train_model.no_sync() if (not last and d.world_size > 1 and parallel == "ddp") else nullcontext()
            with no_sync, autocast:
                losses = train_model(to_device(mb, d.device))
                loss = sum(losses[k] * (sigmoid_weight if k == "sigmoid" else loc_weight) for k in losses)
                (loss / len(micro_batches)).backward()  # DDP and FSDP average over ranks
            for k, v in losses.items():
                parts[k] = parts.get(k, 0.0) + v.detach() / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(pretrainer.parameters(), grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        parts = {k: d.all_reduce_sum(v.reshape(1).float()).item() / d.world_size for k, v in parts.items()}
        total = sum(v * (sigmoid_weight if k == "sigmoid" else loc_weight) for k, v in parts.items())
        if not (math.isfinite(total) and math.isfinite(grad_norm.item())):
            optimizer.zero_grad(set_to_none=True)
            save_checkpoint(ckpt_path, train_model, optimizer, step, d, data_state, config)
            raise SystemExit(f"step {step}: loss {total}, grad norm {grad_norm.item()}: not finite; the state before "
                             f"this step is in {ckpt_path}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.time()
        step_times.append(now - t_last)
        t_last = now
        done = step + 1
        # the median of recent steps: the first pays for start-up, one that validates or saves is slower
        recent = sorted(step_times[1:][-21:] or step_times)
        eta = recent[len(recent) // 2] * (max_steps - done)
        images = batch_size * grad_accum * d.world_size
        if d.is_master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": total, **parts, "lr": optimizer.param_groups[0]["lr"],
                                    "grad_norm": grad_norm.item(), "step_s": step_times[-1]}) + "\n")
            if step % log_every == 0 or done == max_steps:
                detail = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                print(f"step {step:5d}/{max_steps} | loss {total:.4f} ({detail}) | "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} "
                      f"| grad {grad_norm.item():.2f} | {images / step_times[-1]:.0f} images/s | "
                      f"{step_times[-1] * 1000:.0f} ms | ETA {eta / 60:.1f} min", flush=True)
        if eval_every and (done % eval_every == 0 or done == max_steps):
            val_loader = VisionLoader(split="val", rank=d.rank, world_size=d.world_size, **loader_args)
            val = validate(pretrainer if d.world_size == 1 else train_model.module if parallel == "ddp" else pretrainer,
                           val_loader, d, eval_batches, autocast)
            line = " | ".join(f"{k} {v:.4f}" for k, v in val.items())
            d.print(f"step {step:5d} | val {line}"
                    + (" (counting and pointing read off the localisation head alone)" if "count_acc" in val else ""))
            if d.is_master:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
        if save_every and (done % save_every == 0 or done == max_steps):
            save_checkpoint(ckpt_path, train_model, optimizer, done, d, loader.state_dict(), config)

    final_dir = os.path.join(out_dir, "final")
    export_vit(train_model, pretrainer, optimizer, d, final_dir)
    if d.is_master:
        records = []  # the whole run's curve, steps before a resume included (none at max_steps=0)
        if os.path.exists(log_path):
            with open(log_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        last = {}
        for r in records:  # a step redone after a resume: its last line counts
            last[("val" if "val_loss" not in r and any(k.startswith("val_") for k in r) else "train", r["step"])] = r
        curves = {"train": [(s, r["loss"]) for (kind, s), r in sorted(last.items()) if kind == "train"]}
        for key, name in (("val_count_acc", "counting accuracy"), ("val_point_f1", "pointing F1")):
            points = [(s, r[key]) for (kind, s), r in sorted(last.items()) if kind == "val" and key in r]
            if points:
                curves[name] = points
        train = curves.pop("train")
        if train:
            plot_curves({"train loss": train}, os.path.join(out_dir, "loss.png"), title="stage 1 loss")
        if curves:
            plot_curves(curves, os.path.join(out_dir, "readout.png"), title="read off the localisation head (val)",
                        ylabel="accuracy / F1")
        print(f"done: {max_steps - start_step} steps in {(time.time() - t_start) / 60:.1f} min\n{loader.summary()}\n"
              f"ViT: {final_dir} (SiglipVisionModel layout; next: "
              f"{python_command('train_align.py', f'--vit_from={out_dir}')}) | "
              f"log: {log_path} | checkpoint: {ckpt_path}", flush=True)
    d.close()


if __name__ == "__main__":
    main()
