"""Reading shards: resolve a data spec, the training stream and the retrieval split.

Shard layout (img2dataset's): `KEY.jpg` plus `KEY.json` ({"captions": [...]} or {"caption": str}, optional
"image_id") and/or `KEY.txt` (one caption per non-empty line). `tar_reader` turns a shard into raw samples under
the size limits; `samples.decode_or_skip` is the skip contract every sample goes through (any failure is a
counted, reported skip with shard and key; only safe decoders; nothing is ever unpickled).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from r2d2ds.config import DataConfig
from r2d2ds.data.samples import DataError, Sample, SkipCounter, decode_or_skip
from r2d2ds.data.tar_reader import read_shard
from r2d2ds.data.transforms import normalize_batch, pixel_transform
from r2d2ds.data.writer import MANIFEST_FORMAT

logger = logging.getLogger(__name__)

PUBLIC_KEYS = ("image", "input_ids", "attention_mask", "image_id", "key", "skipped")
# A slot checks data.max_skipped_fraction every CHECK_EVERY items once it has seen MIN_CHECKED: judged on
# fewer, one bad shard at the start of a slot (or a slot that only drew broken shards) would stop a healthy run.
MIN_CHECKED, CHECK_EVERY = 1000, 100


# ----------------------------------------------------------------------------------------------- specs


def _from_manifest(path: Path, split: str) -> list[str]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exn:
        raise ValueError(f"manifest '{path}' cannot be read as JSON: {exn}") from exn
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest '{path}': format is not {MANIFEST_FORMAT!r}")
    splits = manifest.get("splits", {})
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise ValueError(f"manifest '{path}' has no split '{split}' (it has: {have})")
    names = splits[split].get("shards", [])
    if not names:
        raise ValueError(f"manifest '{path}': split '{split}' lists no shards")
    shards = [str(path.parent / n) for n in names]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"manifest '{path}', split '{split}': {len(missing)} shard(s) missing, "
                                f"first: '{missing[0]}'")
    return shards


def resolve_shards(spec: str, split: str) -> list[str]:
    """Shard paths for `split` from a dataset directory (manifest.json, else `{split}-*.tar`), a manifest
    path, a single .tar, or a brace pattern / glob of .tar files (`{split}` in a pattern is the split)."""
    if not spec:
        raise ValueError(f"no data given for split '{split}' (set data.train / data.val)")
    p = Path(spec)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return _from_manifest(p / "manifest.json", split)
        found = sorted(glob.glob(str(p / f"{split}-*.tar")))
        if not found:
            raise FileNotFoundError(f"'{spec}' has no manifest.json and no '{split}-*.tar' shards for split "
                                    f"'{split}'")
        return found
    if p.is_file():
        if p.suffix == ".json":
            return _from_manifest(p, split)
        return [spec]
    pattern = spec.replace("{split}", split)
    urls: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if glob.has_magic(part):
            urls.extend(sorted(glob.glob(part)))
        else:
            urls.append(part)
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise FileNotFoundError(f"data spec '{spec}' (split '{split}') matches no shard files"
                                + (f"; missing: '{missing[0]}'" if missing else ""))
    return urls


# ----------------------------------------------------------------------------------------------- samples


def _shard_samples(urls: Iterable[dict[str, str]], max_member_bytes: int) -> Iterator[dict]:
    """Raw samples and error items, shard by shard (see `tar_reader`); counting happens downstream, in the one
    slot that takes each item, so a sample-level split never counts a shard's failure twice."""
    for item in urls:
        yield from read_shard(item["url"], max_member_bytes)


def _take_every(src: Iterable[dict], slot: int, n: int) -> Iterator[dict]:
    for i, sample in enumerate(src):
        if i % n == slot:
            yield sample


def _pick_caption(captions: list[str], key: str, mode: str, seed: int, epoch: int) -> list[str]:
    """The one caption a training sample uses this epoch."""
    if mode == "first" or len(captions) == 1:
        return captions[:1]
    # Seeded per (seed, epoch, key): independent of worker layout and order, so resume replays it exactly.
    h = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return [captions[int.from_bytes(h, "big") % len(captions)]]


def epoch_shards(shards: list[str], slot: int, n_slots: int, seed: int, epoch: int,
                 resampled: bool) -> tuple[list[str], tuple[int, int] | None]:
    """The shards one (rank, worker) slot reads in `epoch`, and the sample-level split (slot, n) if any.

    Non-resampled: one seeded permutation per (seed, epoch), dealt round-robin to the world * workers slots,
    so together the slots read every shard once per epoch. With fewer shards than slots, every slot reads all
    shards and keeps every n-th sample instead (more I/O, same coverage) rather than failing.
    Resampled: each slot draws ceil(shards / slots) shards with replacement from its own seeded generator, so
    no rank runs out on a multi-node job whatever the shard count.
    """
    n = len(shards)
    if resampled:
        rng = random.Random(f"r2d2ds-resampled:{seed}:{epoch}:{slot}")
        return [rng.choice(shards) for _ in range(max(1, math.ceil(n / n_slots)))], None
    order = list(range(n))
    random.Random(f"r2d2ds-shards:{seed}:{epoch}").shuffle(order)
    if n >= n_slots:
        return [shards[i] for i in order[slot::n_slots]], None
    return [shards[i] for i in order], (slot, n_slots)


# ----------------------------------------------------------------------------------------------- training


class _SlotDataset(IterableDataset):
    """Batches of one (rank, worker) slot, forever (or `max_epochs`). Runs in a DataLoader worker or inline.

    `positions[local]` = (epoch, consumed, batches): the resume point of local worker slot `local`, where
    `consumed` counts raw samples taken from the shuffled stream of that epoch. Resuming rebuilds the epoch's
    deterministic stream and drops the first `consumed` raw samples before any image decoding.
    `rotation`: DataLoader worker w plays local slot (w + rotation) % workers, so after a resume the in-order
    DataLoader continues the round-robin with the slot whose batch was due next.
    """

    def __init__(self, shards: list[str], cfg: DataConfig, tokenizer: Any, rank: int, world: int, seed: int,
                 positions: list[tuple[int, int, int]], rotation: int, max_epochs: int | None) -> None:
        super().__init__()
        self.shards, self.cfg, self.tokenizer = shards, cfg, tokenizer
        self.rank, self.world, self.seed = rank, world, seed
        self.positions, self.rotation, self.max_epochs = positions, rotation, max_epochs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        info = get_worker_info()
        workers = max(1, cfg.num_workers)
        local = ((info.id if info is not None else 0) + self.rotation) % workers
        slot, n_slots = self.rank * workers + local, self.world * workers
        where = f"rank {self.rank} worker {local}"
        epoch, consumed, batches = self.positions[local]
        transform = pixel_transform(cfg.image_size, train=True, augment=cfg.augment)
        # Decode JPEGs no smaller than 1.25 x the model size: RandomResizedCrop's smallest crop (scale 0.8,
        # ratio 4/3 -> 0.77 of a side) still covers >= image_size source pixels, so it never upsamples.
        min_size = math.ceil(1.25 * cfg.image_size)
        counter = SkipCounter()
        # Samples short of a full batch at an epoch's end carry over into the next epoch's first batch, so every
        # good sample is trained on once per epoch. A resume position is always taken right after a batch, when
        # nothing is pending, so carrying over never breaks exact resume.
        pending: list[Sample] = []
        empty_epochs = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            urls, split = epoch_shards(self.shards, slot, n_slots, self.seed, epoch, cfg.resampled)
            stages: list[Any] = [wds.SimpleShardList(urls),
                                 partial(_shard_samples, max_member_bytes=cfg.max_member_bytes)]
            if split is not None:
                stages.append(partial(_take_every, slot=split[0], n=split[1]))
            if cfg.shuffle_buffer > 1:
                rng = random.Random(f"r2d2ds-buffer:{self.seed}:{epoch}:{slot}")
                stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng))
            good = 0
            decode = dict(cfg=cfg, tokenizer=self.tokenizer, max_text_len=cfg.max_text_len,
                          transform=partial(self._transform, transform, epoch=epoch),
                          pick=partial(_pick_caption, mode=cfg.caption, seed=self.seed, epoch=epoch),
                          min_size=min_size)
            for idx, raw in enumerate(wds.DataPipeline(*stages)):
                if idx < consumed:
                    continue  # fast-forward of a resumed epoch: no decode, no re-count
                sample = decode_or_skip(raw, counter, **decode)
                if counter.seen >= MIN_CHECKED and counter.seen % CHECK_EVERY == 0:
                    counter.check(cfg.max_skipped_fraction, where)
                if sample is None:
                    continue
                good += 1
                pending.append(sample)
                if len(pending) == cfg.micro_batch:
                    batches += 1
                    yield self._collate(pending, counter, (local, epoch, idx + 1, batches))
                    pending = []
            if good == 0 and consumed == 0:
                empty_epochs += 1
                if empty_epochs >= 3:
                    raise DataError(
                        f"data: {where} read no valid sample in 3 epochs from {len(self.shards)} shard(s) "
                        f"(first '{self.shards[0]}'); {counter.total} skipped ({dict(counter.reasons)}). "
                        "Use fewer data.num_workers / ranks, or more data.")
            else:
                empty_epochs = 0
            epoch, consumed, batches = epoch + 1, 0, 0
        if pending:
            logger.warning("data: %s dropped its last %d sample(s) after %d epoch(s): fewer than "
                           "data.micro_batch=%d", where, len(pending), self.max_epochs, cfg.micro_batch)
        n, reasons = counter.take()
        yield {"_tail": True, "skipped": n, "_reasons": reasons, "tail_dropped": len(pending)}

    def _transform(self, transform: Any, pil: Any, key: str, epoch: int) -> torch.Tensor:
        if not self.cfg.augment:
            return transform(pil)
        # timm's RandomResizedCrop draws from Python's global `random`. Seed it per (seed, epoch, key) so a
        # resumed stream crops exactly as the uninterrupted one would, and restore the caller's state after.
        state = random.getstate()
        random.seed(f"r2d2ds-augment:{self.seed}:{epoch}:{key}")
        try:
            return transform(pil)
        finally:
            random.setstate(state)

    def _collate(self, pending: list[Sample], counter: SkipCounter,
                 pos: tuple[int, int, int, int]) -> dict[str, Any]:
        n, reasons = counter.take()
        return {
            "image": normalize_batch(torch.stack([p.pixels for p in pending])),  # (B, 3, H, W) float32
            "input_ids": torch.tensor([p.input_ids[0] for p in pending], dtype=torch.int64),  # (B, L)
            "attention_mask": torch.tensor([p.attention_mask[0] for p in pending], dtype=torch.int64),  # (B, L)
            "image_id": torch.tensor([p.image_id for p in pending], dtype=torch.int64),  # (B,)
            "key": [p.key for p in pending],
            "skipped": n,
            "_reasons": reasons,
            "_pos": pos,
        }


class TrainStream:
    """Endless training batches for one rank: {"image", "input_ids", "attention_mask", "image_id", "key",
    "skipped"} with exactly `cfg.micro_batch` samples each.

    Shards are split by rank, then by DataLoader worker (see `epoch_shards`); each worker loops over its own
    epochs. Order is fully determined by (shards, cfg, world, seed): seeded shard order per epoch plus a
    seeded shuffle buffer of `cfg.shuffle_buffer` raw samples. `state_dict()` / `load_state_dict()` resume
    exactly: call `iter()` again after loading. `max_epochs` (tests, evaluation) ends each worker after that
    many epochs.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, rank: int = 0, world: int = 1, seed: int = 0,
                 max_epochs: int | None = None, shards: list[str] | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"data: rank {rank} is outside world size {world}")
        self.cfg, self.tokenizer, self.rank, self.world, self.seed = cfg, tokenizer, rank, world, seed
        self.max_epochs = max_epochs
        self.shards = shards if shards is not None else resolve_shards(cfg.train, cfg.train_split)
        self.workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(self.shards) < world * self.workers and rank == 0:
            logger.warning("data: %d shard(s) for %d ranks x %d workers: every worker reads all shards and "
                           "keeps every %d-th sample (write more, smaller shards to avoid the extra reading)",
                           len(self.shards), world, self.workers, world * self.workers)
        self._pos: list[tuple[int, int, int]] = [(0, 0, 0)] * self.workers
        self._next = 0
        self.skipped = 0  # data/skipped: every sample this rank dropped, by reason in skip_reasons
        self.skip_reasons: Counter[str] = Counter()
        self.tail_dropped = 0  # good samples left short of a batch when max_epochs ended the stream

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {"world": self.world, "rank": self.rank, "num_workers": c.num_workers, "seed": self.seed,
                "micro_batch": c.micro_batch, "shuffle_buffer": c.shuffle_buffer, "resampled": c.resampled,
                "num_shards": len(self.shards)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _SlotDataset(self.shards, self.cfg, self.tokenizer, self.rank, self.world, self.seed,
                          list(self._pos), self._next, self.max_epochs)
        if self.cfg.num_workers > 0:
            # Fast tokenizers warn (and can deadlock) when their thread pool crosses a fork into workers.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            # timeout: a worker stuck on a read raises after data.loader_timeout_s instead of hanging every rank.
            # generator: the loader draws its worker base seed from it, not from the global torch RNG, whose
            # state (dropout) must not depend on when the iterator is created (exact resume).
            source: Iterable[dict[str, Any]] = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                                          timeout=self.cfg.loader_timeout_s,
                                                          generator=torch.Generator().manual_seed(self.seed))
        else:
            source = ds
        for item in source:
            self.skipped += int(item["skipped"])
            self.skip_reasons.update(item["_reasons"])
            if item.get("_tail"):
                self.tail_dropped += int(item["tail_dropped"])
                continue
            local, epoch, consumed, batches = (int(v) for v in item["_pos"])
            self._pos[local] = (epoch, consumed, batches)
            self._next = (local + 1) % self.workers
            yield {k: item[k] for k in PUBLIC_KEYS}

    def state_dict(self) -> dict[str, Any]:
        epoch = min(p[0] for p in self._pos)
        return {"epoch": epoch, "batches": sum(p[2] for p in self._pos if p[0] == epoch),
                "slots": [list(p) for p in self._pos], "next_slot": self._next,
                "skipped": self.skipped, "skip_reasons": dict(self.skip_reasons), **self._fingerprint()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        fp = self._fingerprint()
        diff = {k: (sd.get(k), v) for k, v in fp.items() if sd.get(k) != v}
        if diff:
            # Another layout cannot replay the same sample order; restart the oldest epoch instead of failing.
            warnings.warn(f"data: resume state was saved with a different layout {diff} (saved, now); "
                          f"restarting at the beginning of epoch {sd.get('epoch', 0)}", stacklevel=2)
            self._pos = [(int(sd.get("epoch", 0)), 0, 0)] * self.workers
            self._next = 0
        else:
            self._pos = [(int(e), int(c), int(b)) for e, c, b in sd["slots"]]
            self._next = int(sd["next_slot"])
        self.skipped = int(sd.get("skipped", 0))
        self.skip_reasons = Counter(sd.get("skip_reasons", {}))


# ----------------------------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSplit:
    """A whole retrieval split in memory: every caption of every image, in shard order."""

    images: torch.Tensor  # (N, 3, H, W) float32, eval transform
    input_ids: torch.Tensor  # (T, L) int64
    attention_mask: torch.Tensor  # (T, L) int64
    text_to_image: torch.Tensor  # (T,) int64 index into images
    image_keys: list[str]
    image_ids: torch.Tensor  # (N,) int64
    captions: list[str]
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


def load_retrieval_split(spec: str, split: str, tokenizer: Any, image_size: int, max_images: int = 0,
                         max_text_len: int = 32, limits: DataConfig | None = None) -> RetrievalSplit:
    """Every valid image of a split with all its captions. Bad samples are skipped as in training (`limits`:
    the DataConfig whose decoding limits and data.max_skipped_fraction apply; default DataConfig())."""
    cfg = limits or DataConfig()
    shards = resolve_shards(spec, split)
    pixels = pixel_transform(image_size, train=False)
    counter = SkipCounter()
    samples: list[Sample] = []
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards),
                                partial(_shard_samples, max_member_bytes=cfg.max_member_bytes))
    for raw in pipeline:
        if max_images and len(samples) >= max_images:
            break
        sample = decode_or_skip(raw, counter, cfg=cfg, tokenizer=tokenizer, max_text_len=max_text_len,
                                transform=lambda pil, key: pixels(pil))
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise DataError(f"data: split '{split}' of '{spec}' has no valid sample ({counter.total} skipped: "
                        f"{dict(counter.reasons)})")
    counter.check(cfg.max_skipped_fraction, f"split '{split}' of '{spec}'")
    t2i = [i for i, s in enumerate(samples) for _ in s.captions]
    return RetrievalSplit(images=normalize_batch(torch.stack([s.pixels for s in samples])),
                          input_ids=torch.tensor([r for s in samples for r in s.input_ids], dtype=torch.int64),
                          attention_mask=torch.tensor([r for s in samples for r in s.attention_mask],
                                                      dtype=torch.int64),
                          text_to_image=torch.tensor(t2i, dtype=torch.int64), image_keys=[s.key for s in samples],
                          image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.int64),
                          captions=[c for s in samples for c in s.captions],
                          skipped=counter.total, skip_reasons=dict(counter.reasons))
