"""Writing shards in img2dataset's layout (KEY.jpg + KEY.json + KEY.txt) and the dataset manifest."""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from r2d2ds.fileio import atomic_write_text

MANIFEST_FORMAT = "r2d2ds-shards/1"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: the same input gives byte-identical shards
    tf.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes `{split}-{000000..}.tar` shards of at most `shard_size` samples into `out_dir`.

    Each shard is written under a `.tmp` name and renamed when complete, so an interrupted prepare never
    leaves a half-written shard under a name that `*.tar` or the manifest would pick up.
    """

    def __init__(self, out_dir: str | Path, split: str, shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.shard_size = shard_size
        self.shards: list[str] = []
        self.samples = 0
        self.captions = 0
        self._tf: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / (name + ".tmp")
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(name)
        self._in_shard = 0

    def _finish(self) -> None:
        if self._tf is None:
            return
        self._tf.close()
        os.replace(self._tmp, self.out_dir / self.shards[-1])
        self._tf = None

    def write(self, key: str, image: bytes, captions: list[str], image_id: int,
              extra: dict | None = None) -> None:
        if "." in key or "/" in key:
            # webdataset groups members by the name up to the first dot: a dot in the key would split it.
            raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
        if self._tf is None or self._in_shard >= self.shard_size:
            self._finish()
            self._open()
        meta: dict[str, Any] = {"captions": captions, "image_id": int(image_id), "key": key}
        if extra:
            meta.update(extra)
        _add(self._tf, f"{key}.jpg", image)
        _add(self._tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        _add(self._tf, f"{key}.txt", captions[0].encode("utf-8"))
        self._in_shard += 1
        self.samples += 1
        self.captions += len(captions)

    def close(self) -> dict[str, Any]:
        self._finish()
        return {"shards": list(self.shards), "samples": self.samples, "captions": self.captions}


def write_manifest(out_dir: str | Path, splits: dict[str, dict[str, Any]], source: Any,
                   skipped: dict[str, int], **extra: Any) -> Path:
    manifest = {
        "format": MANIFEST_FORMAT,
        "splits": splits,
        "source": source,
        "skipped": dict(skipped),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return atomic_write_text(Path(out_dir) / "manifest.json",
                             json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
