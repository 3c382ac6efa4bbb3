"""Reading shards: resolve a data spec, parse samples safely, the training stream and the retrieval split.

Shard layout (img2dataset's): `KEY.jpg` plus `KEY.json` ({"captions": [...]} or {"caption": str}, optional
"image_id") and/or `KEY.txt` (one caption per non-empty line). Only safe decoders run on shard bytes: PIL for
images, `json` for metadata, UTF-8 for text. Nothing is ever unpickled.

Bad input never stops training: a corrupt image, an empty or missing caption, a missing image, or a broken tar
member is skipped, counted by reason, and reported once (shard + key) through `logging`. A tar that breaks
mid-member ends that shard (one report) and the stream continues with the next shard.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import tarfile
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
from r2d2ds.data.transforms import decode_image, normalize_batch, pixel_transform
from r2d2ds.data.writer import MANIFEST_FORMAT

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PUBLIC_KEYS = ("image", "input_ids", "attention_mask", "image_id", "key", "skipped")
_REPORTED: set[tuple[str, str, str]] = set()  # per process: each bad (shard, key, reason) is logged once


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


def key_to_image_id(key: str) -> int:
    """A stable non-negative 63-bit id from a sample key (equal keys, equal ids; not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Skipped samples by reason. `take()` returns and clears the counts since the previous call."""

    def __init__(self) -> None:
        self.total = 0
        self.reasons: Counter[str] = Counter()
        self._delta: Counter[str] = Counter()

    def skip(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        self.total += 1
        self.reasons[reason] += 1
        self._delta[reason] += 1
        ident = (shard, key, reason)
        if ident not in _REPORTED:
            _REPORTED.add(ident)
            logger.warning("data/skipped: shard '%s' key '%s': %s%s", shard, key, reason,
                           f" ({detail})" if detail else "")

    def take(self) -> tuple[int, dict[str, int]]:
        delta = dict(self._delta)
        self._delta.clear()
        return sum(delta.values()), delta


def parse_sample(raw: dict[str, Any]) -> tuple[bytes, list[str], int]:
    """(image bytes, non-empty captions, image id) of a raw webdataset sample; raises BadSample. No decoding
    of the image here, so callers can check a sample cheaply before paying for the decode."""
    key = raw.get("__key__", "?")
    image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    captions: list[str] | None = None
    image_id: int | None = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exn:
            raise BadSample("bad_json", str(exn)) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", "top level is not an object")
        if isinstance(meta.get("captions"), list):
            captions = [c for c in meta["captions"] if isinstance(c, str)]
        elif isinstance(meta.get("caption"), str):
            captions = [meta["caption"]]
        iid = meta.get("image_id")
        if isinstance(iid, int) and not isinstance(iid, bool):
            image_id = iid
    if captions is None and "txt" in raw:
        try:
            captions = raw["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError as exn:
            raise BadSample("bad_text", str(exn)) from None
    if captions is None:
        raise BadSample("no_caption")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise BadSample("empty_caption")
    if image is None:
        raise BadSample("no_image")
    return image, captions, image_id if image_id is not None else key_to_image_id(key)


class _TarErrors:
    """webdataset exception handler for one shard: count and report the first tar-level error once, then let
    webdataset drop the rest of the shard (a truncated tar cannot be resynchronised in stream mode)."""

    def __init__(self, url: str, counter: SkipCounter, active: list[bool]) -> None:
        self.url = url
        self.counter = counter
        self.active = active  # shared flag: False while fast-forwarding a resumed epoch (already counted)
        self.seen: set[str] = set()

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, (FileNotFoundError, PermissionError)):
            reason = "unreadable_shard"
        elif isinstance(exn, (tarfile.TarError, EOFError, OSError)):
            reason = "broken_tar"
        else:
            reason = "bad_member"  # e.g. a duplicate member name
        # A truncation raises twice (member read, then next header): count it once per shard and reason.
        if reason not in self.seen:
            self.seen.add(reason)
            if self.active[0]:
                self.counter.skip(self.url, "-", reason, str(exn.args[0]) if exn.args else type(exn).__name__)
        return True


def _shard_samples(urls: Iterable[dict[str, str]], counter: SkipCounter,
                   active: list[bool]) -> Iterator[dict]:
    """Raw samples shard by shard. Each shard runs through its own `tarfile_to_samples` so a shard broken
    mid-sample flushes its partial sample at its own end instead of merging it with the next shard's first
    sample (webdataset's shared grouping would, and would then drop both on a duplicate name)."""
    for item in urls:
        url = item["url"]
        yield from wds.tarfile_to_samples(handler=_TarErrors(url, counter, active))(iter([{"url": url}]))


def _take_every(src: Iterable[dict], slot: int, n: int) -> Iterator[dict]:
    for i, sample in enumerate(src):
        if i % n == slot:
            yield sample


def _pick_caption(captions: list[str], mode: str, seed: int, epoch: int, key: str) -> str:
    if mode == "first" or len(captions) == 1:
        return captions[0]
    # Seeded per (seed, epoch, key): independent of worker layout and order, so resume replays it exactly.
    h = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return captions[int.from_bytes(h, "big") % len(captions)]


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
        epoch, consumed, batches = self.positions[local]
        transform = pixel_transform(cfg.image_size, train=True, augment=cfg.augment)
        # Decode JPEGs no smaller than 1.25 x the model size: RandomResizedCrop's smallest crop (scale 0.8,
        # ratio 4/3 -> 0.77 of a side) still covers >= image_size source pixels, so it never upsamples.
        min_size = math.ceil(1.25 * cfg.image_size)
        counter = SkipCounter()
        empty_epochs = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            urls, split = epoch_shards(self.shards, slot, n_slots, self.seed, epoch, cfg.resampled)
            # With a sample-level split every slot reads every shard: only global slot 0 counts tar errors.
            active = [consumed == 0 and (split is None or slot == 0)]
            count_tar = split is None or slot == 0
            stages: list[Any] = [wds.SimpleShardList(urls),
                                 partial(_shard_samples, counter=counter, active=active)]
            if split is not None:
                stages.append(partial(_take_every, slot=split[0], n=split[1]))
            if cfg.shuffle_buffer > 1:
                rng = random.Random(f"r2d2ds-buffer:{self.seed}:{epoch}:{slot}")
                stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng))
            pending: list[tuple[str, torch.Tensor, str, int]] = []
            made = 0
            for idx, raw in enumerate(wds.DataPipeline(*stages)):
                if idx < consumed:
                    continue  # fast-forward of a resumed epoch: no decode, no re-count
                active[0] = count_tar
                key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
                try:
                    image, captions, image_id = parse_sample(raw)
                    try:
                        # A transform can fail on a degenerate image too: same reason, same skip.
                        pixels = self._transform(transform, decode_image(image, min_size), epoch, key)
                    except Exception as exn:  # PIL: OSError, SyntaxError, ValueError, DecompressionBomb...
                        raise BadSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
                except BadSample as bad:
                    counter.skip(url, key, bad.reason, bad.detail)
                    continue
                caption = _pick_caption(captions, cfg.caption, self.seed, epoch, key)
                pending.append((key, pixels, caption, image_id))
                if len(pending) == cfg.micro_batch:
                    batches += 1
                    made += 1
                    yield self._collate(pending, counter, (local, epoch, idx + 1, batches))
                    pending = []
            # The remainder (< micro_batch) is dropped: every rank must yield equal batch shapes.
            if made == 0 and consumed == 0:
                empty_epochs += 1
                if empty_epochs >= 3:
                    raise RuntimeError(
                        f"data: rank {self.rank} worker {local} made no batch of data.micro_batch="
                        f"{cfg.micro_batch} valid samples in 3 epochs from {len(self.shards)} shard(s) "
                        f"(first '{self.shards[0]}'); {counter.total} skipped ({dict(counter.reasons)}). "
                        "Use fewer data.num_workers / ranks, a smaller data.micro_batch, or more data.")
            else:
                empty_epochs = 0
            epoch, consumed, batches = epoch + 1, 0, 0
        n, reasons = counter.take()
        yield {"_tail": True, "skipped": n, "_reasons": reasons}

    def _transform(self, transform: Any, pil: Any, epoch: int, key: str) -> torch.Tensor:
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

    def _collate(self, pending: list, counter: SkipCounter, pos: tuple[int, int, int, int]) -> dict[str, Any]:
        keys = [p[0] for p in pending]
        enc = self.tokenizer([p[2] for p in pending], padding="max_length", truncation=True,
                             max_length=self.cfg.max_text_len, return_tensors="pt")
        n, reasons = counter.take()
        return {
            "image": normalize_batch(torch.stack([p[1] for p in pending])),  # (B, 3, H, W) float32
            "input_ids": enc["input_ids"].long(),  # (B, L)
            "attention_mask": enc["attention_mask"].long(),  # (B, L)
            "image_id": torch.tensor([p[3] for p in pending], dtype=torch.int64),  # (B,)
            "key": keys,
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
        self.skipped = 0
        self.skip_reasons: Counter[str] = Counter()

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
            source: Iterable[dict[str, Any]] = DataLoader(ds, batch_size=None,
                                                          num_workers=self.cfg.num_workers)
        else:
            source = ds
        for item in source:
            self.skipped += int(item["skipped"])
            self.skip_reasons.update(item["_reasons"])
            if item.get("_tail"):
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
                         max_text_len: int = 32) -> RetrievalSplit:
    shards = resolve_shards(spec, split)
    transform = pixel_transform(image_size, train=False)
    counter = SkipCounter()
    images: list[torch.Tensor] = []
    keys: list[str] = []
    ids: list[int] = []
    texts: list[str] = []
    t2i: list[int] = []
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards),
                                partial(_shard_samples, counter=counter, active=[True]))
    for raw in pipeline:
        if max_images and len(images) >= max_images:
            break
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        try:
            image, captions, image_id = parse_sample(raw)
            try:
                pixels = transform(decode_image(image))
            except Exception as exn:  # any PIL decode failure is a corrupt image
                raise BadSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
        except BadSample as bad:
            counter.skip(url, key, bad.reason, bad.detail)
            continue
        for c in captions:
            texts.append(c)
            t2i.append(len(images))
        images.append(pixels)
        keys.append(key)
        ids.append(image_id)
    if not images:
        raise ValueError(f"data: split '{split}' of '{spec}' has no valid sample ({counter.total} skipped: "
                         f"{dict(counter.reasons)})")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_text_len,
                    return_tensors="pt")
    return RetrievalSplit(images=normalize_batch(torch.stack(images)), input_ids=enc["input_ids"].long(),
                          attention_mask=enc["attention_mask"].long(),
                          text_to_image=torch.tensor(t2i, dtype=torch.int64), image_keys=keys,
                          image_ids=torch.tensor(ids, dtype=torch.int64), captions=texts,
                          skipped=counter.total, skip_reasons=dict(counter.reasons))
