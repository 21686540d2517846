"""``resolve_shards(spec) -> ShardSet``: what ``data.shards`` points at, as the loader needs it.

A ``ShardSet`` holds the shard URLs and, when a ``manifest.json`` is found for the spec, the
per-shard sample counts and the class names. The accepted spec forms (a manifest, a shard
folder, a brace pattern, ``pipe:`` URLs, ...) are those of ``data_tools.manifest.resolve_shards``.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_tools.manifest import find_manifest
from data_tools.manifest import resolve_shards as manifest_shard_urls
from runtime.errors import InputError


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: list[int] | None = None  # per shard, when a manifest gives it
    classes: list[str] | None = None

    @property
    def total_samples(self) -> int | None:
        return sum(self.num_samples) if self.num_samples is not None else None


def resolve_shards(spec: str) -> ShardSet:
    """Shard URLs (and per-shard counts and classes when a manifest is found) for
    ``data.shards``; see ``data_tools.manifest.resolve_shards`` for the accepted forms."""
    if not spec:
        raise InputError("data.shards is empty: give a manifest.json, a shard directory or "
                         "a shard pattern")
    try:
        manifest = find_manifest(spec)
        if manifest is not None:
            return ShardSet(manifest.urls(), [s.num_samples for s in manifest.shards],
                            list(manifest.classes))
        return ShardSet(manifest_shard_urls(spec))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"data.shards={spec!r}: {err}") from err
