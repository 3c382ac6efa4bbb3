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

    A slot reads *segments*: [epoch, n_base, base, consumed] is the deterministic stream of base slot `base` of
    an epoch laid out over `n_base` slots (its shards from `epoch_shards`, its seeded shuffle buffer), of which
    the first `consumed` raw samples are already trained on. `slots[local]` = {"segments", "next_epoch",
    "batches"} is the resume point of local worker slot `local`: it reads its segments in order, then epoch
    `next_epoch`, `next_epoch + 1`, ... as slot `rank * workers + local` of the current layout. Normally its one
    segment is its own current epoch; after a change of world size or workers (`remap_positions`) it first
    finishes the unread remainders of the old layout's streams it was given. Resuming rebuilds each stream and
    drops its first `consumed` raw samples before any image decoding.
    `rotation`: DataLoader worker w plays local slot (w + rotation) % workers, so after a resume the in-order
    DataLoader continues the round-robin with the slot whose batch was due next.
    """

    def __init__(self, shards: list[str], cfg: DataConfig, tokenizer: Any, rank: int, world: int, seed: int,
                 slots: list[dict[str, Any]], rotation: int, max_epochs: int | None) -> None:
        super().__init__()
        self.shards, self.cfg, self.tokenizer = shards, cfg, tokenizer
        self.rank, self.world, self.seed = rank, world, seed
        self.slots, self.rotation, self.max_epochs = slots, rotation, max_epochs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        info = get_worker_info()
        workers = max(1, cfg.num_workers)
        local = ((info.id if info is not None else 0) + self.rotation) % workers
        slot, n_slots = self.rank * workers + local, self.world * workers
        where = f"rank {self.rank} worker {local}"
        state = self.slots[local]
        segments = [list(seg) for seg in state["segments"]]
        next_epoch, batches = int(state["next_epoch"]), int(state["batches"])
        transform = pixel_transform(cfg.image_size, train=True, augment=cfg.augment)
        # Decode JPEGs no smaller than 1.25 x the model size: RandomResizedCrop's smallest crop (scale 0.8,
        # ratio 4/3 -> 0.77 of a side) still covers >= image_size source pixels, so it never upsamples.
        min_size = math.ceil(1.25 * cfg.image_size)
        counter = SkipCounter()
        # Samples short of a full batch at a segment's end carry over into the next segment's first batch, so
        # every good sample is trained on once per epoch. A resume position is always taken right after a batch,
        # when nothing is pending, so carrying over never breaks exact resume.
        pending: list[Sample] = []
        empty_epochs = 0
        while True:
            if not segments:
                if self.max_epochs is not None and next_epoch >= self.max_epochs:
                    break
                segments.append([next_epoch, n_slots, slot, 0])
                next_epoch += 1
            epoch, n_base, base, consumed = (int(v) for v in segments[0])
            urls, split = epoch_shards(self.shards, base, n_base, self.seed, epoch, cfg.resampled)
            stages: list[Any] = [wds.SimpleShardList(urls),
                                 partial(_shard_samples, max_member_bytes=cfg.max_member_bytes)]
            if split is not None:
                stages.append(partial(_take_every, slot=split[0], n=split[1]))
            if cfg.shuffle_buffer > 1:
                rng = random.Random(f"r2d2ds-buffer:{self.seed}:{epoch}:{base}")
                stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng))
            good = 0
            decode = dict(cfg=cfg, tokenizer=self.tokenizer, max_text_len=cfg.max_text_len,
                          transform=partial(self._transform, transform, epoch=epoch),
                          pick=partial(_pick_caption, mode=cfg.caption, seed=self.seed, epoch=epoch),
                          min_size=min_size)
            for idx, raw in enumerate(wds.DataPipeline(*stages)):
                if idx < consumed:
                    continue  # fast-forward of a resumed stream: no decode, no re-count
                sample = decode_or_skip(raw, counter, **decode)
                if counter.seen >= MIN_CHECKED and counter.seen % CHECK_EVERY == 0:
                    counter.check(cfg.max_skipped_fraction, where)
                if sample is None:
                    continue
                good += 1
                pending.append(sample)
                if len(pending) == cfg.micro_batch:
                    batches += 1
                    pos = {"local": local, "segments": [[epoch, n_base, base, idx + 1], *segments[1:]],
                           "next_epoch": next_epoch, "batches": batches}
                    yield self._collate(pending, counter, pos)
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
            segments.pop(0)
            if not segments or int(segments[0][0]) != epoch:
                batches = 0  # `batches` counts this slot's batches of its current epoch
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

    def _collate(self, pending: list[Sample], counter: SkipCounter, pos: dict[str, Any]) -> dict[str, Any]:
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


# Keys of the saved fingerprint that define the streams themselves: with any of them changed no saved position
# means anything. The layout keys (world, rank, num_workers) only say who reads which stream: a change there is
# remapped exactly (`remap_positions`). micro_batch changes neither.
_STREAM_KEYS = ("seed", "shuffle_buffer", "resampled", "num_shards")
_LAYOUT_KEYS = ("world", "rank", "num_workers")


def _fresh_slot(next_epoch: int = 0) -> dict[str, Any]:
    return {"segments": [], "next_epoch": next_epoch, "batches": 0}


def _saved_slots(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """The slot states of a saved data state; the older [epoch, consumed, batches] entries are converted."""
    workers = max(1, int(sd.get("num_workers", 0)))
    out = []
    for local, entry in enumerate(sd["slots"]):
        if isinstance(entry, dict):
            out.append({"segments": [[int(v) for v in seg] for seg in entry["segments"]],
                        "next_epoch": int(entry["next_epoch"]), "batches": int(entry["batches"])})
        else:
            epoch, consumed, batches = (int(v) for v in entry)
            base, n_base = int(sd["rank"]) * workers + local, int(sd["world"]) * workers
            out.append({"segments": [[epoch, n_base, base, consumed]], "next_epoch": epoch + 1, "batches": batches})
    return out


def remap_positions(states: list[dict[str, Any]], rank: int, world: int, workers: int) -> list[dict[str, Any]]:
    """The slot states of `rank` (of `world` ranks x `workers` workers) that continue a run saved by another
    layout, given the data state of *every* rank of that run (`TrainStream.state_dict()`).

    Exact coverage: every epoch that any old slot had started is finished by reading what is left of it, and
    nothing else of it. What is left is (a) the unread tail of every segment an old slot still held (its current
    stream from `consumed` on, and remainders it had been given) and (b) the whole stream of every old slot that
    had not yet started that epoch. These segments, oldest epoch first, are dealt round-robin over the new slots
    in rank-interleaved order (worker 0 of every rank first), so the ranks share them evenly; after its
    segments every new slot goes on with the epoch after the newest one started, in the new layout. Nothing is
    read twice and nothing skipped within an epoch; a new slot given no segment starts the next epoch early.
    """
    if not states:
        raise ValueError("data: remapping positions needs the saved data state of every rank")
    old_world = int(states[0]["world"])
    if sorted(int(sd["rank"]) for sd in states) != list(range(old_world)):
        raise ValueError(f"data: remapping positions needs the data state of each of the {old_world} saved ranks "
                         f"once; got ranks {sorted(int(sd['rank']) for sd in states)}")
    for sd in states:
        diff = {k: (sd.get(k), states[0].get(k)) for k in (*_STREAM_KEYS, "world", "num_workers")
                if sd.get(k) != states[0].get(k)}
        if diff:
            raise ValueError(f"data: the saved ranks' data states disagree: {diff}")
    slots = {(int(sd["rank"]), local): st for sd in states for local, st in enumerate(_saved_slots(sd))}
    newest = max(st["next_epoch"] for st in slots.values()) - 1  # every epoch below a slot's next_epoch is started
    old_workers = max(1, int(states[0].get("num_workers", 0)))
    left: list[list[int]] = []
    for (old_rank, local), st in slots.items():
        left.extend(st["segments"])
        base = old_rank * old_workers + local
        left.extend([epoch, old_world * old_workers, base, 0] for epoch in range(st["next_epoch"], newest + 1))
    left.sort(key=lambda seg: (seg[0], seg[1], seg[2]))
    order = [(r, w) for w in range(workers) for r in range(world)]
    mine = [_fresh_slot(newest + 1) for _ in range(workers)]
    for i, seg in enumerate(left):
        r, w = order[i % len(order)]
        if r == rank:
            mine[w]["segments"].append(seg)
    return mine


class TrainStream:
    """Endless training batches for one rank: {"image", "input_ids", "attention_mask", "image_id", "key",
    "skipped"} with exactly `cfg.micro_batch` samples each.

    Shards are split by rank, then by DataLoader worker (see `epoch_shards`); each worker loops over its own
    epochs. Order is fully determined by (shards, cfg, world, seed): seeded shard order per epoch plus a
    seeded shuffle buffer of `cfg.shuffle_buffer` raw samples. `state_dict()` / `load_state_dict()` resume
    exactly: call `iter()` again after loading. A state saved with another number of ranks or workers is
    remapped (`remap_positions`, needs every saved rank's state) so that the interrupted epoch is finished
    without a sample twice or one left out. `max_epochs` (tests, evaluation) ends each worker after that many
    epochs.
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
        self._slots: list[dict[str, Any]] = [_fresh_slot() for _ in range(self.workers)]
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
                          [dict(s) for s in self._slots], self._next, self.max_epochs)
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
            pos = item["_pos"]
            local = int(pos["local"])
            self._slots[local] = {"segments": [[int(v) for v in seg] for seg in pos["segments"]],
                                  "next_epoch": int(pos["next_epoch"]), "batches": int(pos["batches"])}
            self._next = (local + 1) % self.workers
            yield {k: item[k] for k in PUBLIC_KEYS}

    def state_dict(self) -> dict[str, Any]:
        current = [s["segments"][0][0] if s["segments"] else s["next_epoch"] for s in self._slots]
        epoch = min(current)
        return {"epoch": epoch, "batches": sum(s["batches"] for s, e in zip(self._slots, current) if e == epoch),
                "slots": [{"segments": [list(seg) for seg in s["segments"]], "next_epoch": s["next_epoch"],
                           "batches": s["batches"]} for s in self._slots],
                "next_slot": self._next, "skipped": self.skipped, "skip_reasons": dict(self.skip_reasons),
                **self._fingerprint()}

    def load_state_dict(self, sd: dict[str, Any], all_states: Any = None) -> None:
        """Resume from this rank's saved state `sd`. When the saved layout (world size, rank, workers) differs,
        `all_states` (every saved rank's state, or a function returning them) is needed to remap exactly."""
        fp = self._fingerprint()
        stream_diff = {k: (sd.get(k), fp[k]) for k in _STREAM_KEYS if sd.get(k) != fp[k]}
        if stream_diff:
            # Other streams cannot continue the saved ones; restart the oldest epoch instead of failing.
            warnings.warn(f"data: resume state was saved with a different layout {stream_diff} (saved, now); "
                          f"restarting at the beginning of epoch {sd.get('epoch', 0)}", stacklevel=2)
            self._slots = [_fresh_slot(int(sd.get("epoch", 0))) for _ in range(self.workers)]
            self._next = 0
        elif all(sd.get(k) == fp[k] for k in _LAYOUT_KEYS):
            self._slots = _saved_slots(sd)
            self._next = int(sd["next_slot"])
        else:
            states = all_states() if callable(all_states) else all_states
            if not states:
                layout = {k: (sd.get(k), fp[k]) for k in _LAYOUT_KEYS if sd.get(k) != fp[k]}
                raise ValueError(f"data: the resume state was saved by another layout {layout} (saved, now); "
                                 "remapping the data position needs the saved state of every rank")
            self._slots = remap_positions(list(states), self.rank, self.world, self.workers)
            self._next = 0
            # The skip counters are per rank: old rank r's go to new rank r % world, so their sum is kept.
            kept = [st for st in states if int(st["rank"]) % self.world == self.rank]
            self.skipped = sum(int(st.get("skipped", 0)) for st in kept)
            self.skip_reasons = sum((Counter(st.get("skip_reasons", {})) for st in kept), Counter())
            return
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
