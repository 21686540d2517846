"""The shard-set manifest and shard URL resolution.

A shard set is a folder of ``<prefix>-%06d.tar`` files with a ``manifest.json`` beside them::

    {"shards": [{"url": "train-000000.tar", "num_samples": 64, "size_bytes": 1234567}, ...],
     "num_samples": 640, "classes": ["move_right", ...], ...}

Shard URLs in the manifest are relative to the manifest's folder, so a shard set can be
moved or copied as a whole. ``num_samples`` lets the loader know the epoch length without
opening a tar. Extra top-level fields (``prefix``, ``class_counts``, ``total_bytes``,
``total_duration``, ``num_rejects``, ``reencode``, ...) are kept as ``Manifest.extra``.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from runtime.io import atomic_write_text

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"
# Fields every ``<key>.json`` carries (docs/interfaces.md); ``start``/``end`` and
# task-specific fields are optional.
SAMPLE_FIELDS = ("label", "label_name", "source", "fps", "num_frames", "width", "height",
                 "duration")


def shard_name(prefix: str, index: int) -> str:
    return SHARD_PATTERN.format(prefix=prefix, index=index)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    size_bytes: int | None = None

    def to_dict(self) -> dict:
        out = {"url": self.url, "num_samples": self.num_samples}
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        return out


@dataclass
class Manifest:
    """A shard set's manifest. ``root`` is the folder the shard URLs are relative to."""

    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    root: Path | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def urls(self) -> list[str]:
        """Shard locations usable by webdataset: relative URLs joined onto ``root``."""
        return [_join(self.root, s.url) for s in self.shards]

    def to_dict(self) -> dict:
        return {"shards": [s.to_dict() for s in self.shards], "num_samples": self.num_samples,
                "classes": list(self.classes), **self.extra}

    @classmethod
    def from_dict(cls, data: dict, root: Path | None = None, origin: str = "manifest") -> Manifest:
        """Parse and validate; errors name ``origin`` and the offending entry."""
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise ValueError(f"{origin}: expected an object with a 'shards' list")
        shards = []
        for i, entry in enumerate(data["shards"]):
            if (not isinstance(entry, dict) or not isinstance(entry.get("url"), str)
                    or not isinstance(entry.get("num_samples"), int) or entry["num_samples"] < 0):
                raise ValueError(f"{origin}: shards[{i}] must have a string 'url' and a "
                                 f"non-negative int 'num_samples', got {entry!r}")
            shards.append(ShardInfo(entry["url"], entry["num_samples"], entry.get("size_bytes")))
        classes = data.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{origin}: 'classes' must be a list of strings")
        manifest = cls(shards=shards, classes=classes, root=root,
                       extra={k: v for k, v in data.items()
                              if k not in ("shards", "num_samples", "classes")})
        total = data.get("num_samples")
        if total is not None and total != manifest.num_samples:
            raise ValueError(f"{origin}: num_samples is {total} but the shards hold "
                             f"{manifest.num_samples}")
        return manifest


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _join(root: Path | None, url: str) -> str:
    if root is None or _is_remote(url) or os.path.isabs(url):
        return url
    return str(root / url)


def _manifest_path(spec: str | Path) -> Path | None:
    path = Path(spec)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    if path.suffix == ".json" and path.is_file():
        return path
    return None


def load_manifest(path: str | Path) -> Manifest:
    """Load ``manifest.json`` (or the one inside the folder ``path``)."""
    file = _manifest_path(path)
    if file is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {path}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON: {err}") from err
    return Manifest.from_dict(data, root=file.parent, origin=str(file))


def find_manifest(spec: str | Path | Sequence[str]) -> Manifest | None:
    """The manifest for a shard spec that names a shard-set folder or a manifest file, else None."""
    if isinstance(spec, (str, Path)) and not _is_remote(str(spec)):
        if _manifest_path(spec) is not None:
            return load_manifest(spec)
    return None


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary name, then rename)."""
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=1) + "\n")
    return path


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Turn a shard specification into a list of shard URLs.

    ``spec`` may be a shard-set folder (its manifest's shards, else its sorted ``*.tar``),
    a ``manifest.json`` path, a glob (``data/train-*.tar``), a brace pattern
    (``train-{000000..000015}.tar``), several of these joined by ``::``, a list of them,
    or remote URLs (``http://``, ``pipe:``), which are passed through brace-expanded.
    Raises ``FileNotFoundError`` naming the spec when nothing matches.
    """
    if not isinstance(spec, (str, Path)):
        return [url for part in spec for url in resolve_shards(part)]
    text = str(spec)
    if "::" in text:
        return resolve_shards(text.split("::"))
    from webdataset.shardlists import expand_urls  # brace expansion, as webdataset does it

    if _is_remote(text):
        return expand_urls(text)
    manifest = find_manifest(text)
    if manifest is not None:
        return manifest.urls()
    path = Path(text)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif path.is_file():
        urls = [text]
    else:
        urls = sorted(match for pattern in expand_urls(text) for match in glob.glob(pattern))
    if not urls:
        raise FileNotFoundError(f"no shards found for {text!r}")
    return urls
