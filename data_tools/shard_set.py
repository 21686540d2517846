"""What ``data.shards`` names: one shard set, or several weighted ones mixed while resampling.

``data.shards`` is either one shard set - a manifest, a shard folder, a brace pattern,
``pipe:`` URLs, ... (the forms of ``data_tools.manifest.resolve_shards``) - or a mapping from
a set's name to its ``path`` (any of those forms) and sampling ``weight``::

    shards:
      k710: {path: /data/k710/train, weight: 0.335}
      ssv2: {path: /data/ssv2/train, weight: 0.1}
      howto100m: {path: /data/howto/train, weight: 0.565}

- ``resolve_shards(spec) -> ShardSet``: the shard URLs of one set (and per-shard counts and
  class names when a manifest is found). A mapping is refused: stages that read a set once
  (evaluation, probes, features) or need its classes read one set.
- ``shard_sources(spec) -> [ShardSource]``: the sets with their weights (a string is one set
  of weight 1); ``mixture_spec`` writes them back as a mapping.
- ``WeightedMix``: the first stage of a resampled loader over several sets (pretrain / train
  modes): each set is resampled from its own shards and the mix takes samples from them by
  weight, deterministically (below).

How samples are drawn: smooth weighted round-robin. Each draw adds every set's weight
(normalised to sum to 1) to its credit, takes the next sample from the set with the most
credit and subtracts 1 from that set's credit. Over any ``n`` consecutive draws set ``k``
therefore supplies ``n * w_k`` samples up to one, so the proportions hold within every
DataLoader worker, stream and epoch instead of only in expectation (V-JEPA 2 draws each
sample independently with these probabilities). The order carries no randomness and the
samples themselves come from seeded resampling and the shuffle buffer after the mix, so a
loader rebuilt from the same seed reads the same samples (exact resume). Labels of the sets
are passed through unchanged (their label spaces may differ; pretraining ignores them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset

from data_tools.loader_stats import LoaderStats, SkipHandler
from data_tools.manifest import find_manifest
from data_tools.manifest import resolve_shards as manifest_shard_urls
from data_tools.seeding import WorkerSeed
from runtime.errors import InputError

ShardSpec = str | dict[str, dict[str, Any]]


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: list[int] | None = None  # per shard, when a manifest gives it
    classes: list[str] | None = None

    @property
    def total_samples(self) -> int | None:
        return sum(self.num_samples) if self.num_samples is not None else None


@dataclass(frozen=True)
class ShardSource:
    """One shard set of ``data.shards``: ``name`` ("" for a single unnamed set), ``path``
    (what ``resolve_shards`` accepts) and sampling ``weight`` (> 0, relative)."""

    name: str
    path: str
    weight: float = 1.0

    @property
    def where(self) -> str:
        """The config key naming this set's path, for messages."""
        return f"data.shards.{self.name}.path" if self.name else "data.shards"


def is_mixture(spec: ShardSpec) -> bool:
    """Whether ``data.shards`` names several weighted shard sets (a mapping)."""
    return isinstance(spec, Mapping)


def shard_sources(spec: ShardSpec) -> list[ShardSource]:
    """The shard sets of ``data.shards`` in the order given; raises ValueError naming the
    offending key when a mapping entry is not ``{path: str, weight: number > 0}``."""
    if not is_mixture(spec):
        if not isinstance(spec, str):
            raise ValueError(f"data.shards must be a shard path or a mapping of named shard "
                             f"sets to {{path, weight}}, got {spec!r}")
        return [ShardSource("", spec)]
    if not spec:
        raise ValueError("data.shards is an empty mapping: name at least one shard set")
    sources = []
    for name, entry in spec.items():
        where = f"data.shards.{name}"
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"data.shards: set name {name!r} must be a non-empty string "
                             "without '/'")
        if not isinstance(entry, Mapping) or set(entry) != {"path", "weight"}:
            raise ValueError(f"{where} must be a mapping with exactly the keys 'path' and "
                             f"'weight', got {entry!r} (data.shards.{name}.path=... and "
                             f"data.shards.{name}.weight=... change one set; a new set needs "
                             "both)")
        path, weight = entry["path"], entry["weight"]
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}.path must be a non-empty shard path, got {path!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight must be a number > 0, got {weight!r}")
        sources.append(ShardSource(name, path, float(weight)))
    return sources


def mixture_spec(sources: list[ShardSource]) -> dict[str, dict[str, Any]]:
    """``data.shards`` mapping for ``sources`` (the inverse of ``shard_sources``)."""
    return {s.name: {"path": s.path, "weight": s.weight} for s in sources}


def resolve_shards(spec: ShardSpec, where: str = "data.shards") -> ShardSet:
    """Shard URLs (and per-shard counts and classes when a manifest is found) of one shard
    set; see ``data_tools.manifest.resolve_shards`` for the accepted forms. ``where`` names
    the config key in errors."""
    if is_mixture(spec):
        raise InputError(f"{where} names several weighted shard sets ({', '.join(spec)}); "
                         "only resampled pretraining / training reads a mixture: give this "
                         "stage one shard set")
    if not spec:
        raise InputError(f"{where} is empty: give a manifest.json, a shard directory or "
                         "a shard pattern")
    try:
        manifest = find_manifest(spec)
        if manifest is not None:
            return ShardSet(manifest.urls(), [s.num_samples for s in manifest.shards],
                            list(manifest.classes))
        return ShardSet(manifest_shard_urls(spec))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{where}={spec!r}: {err}") from err


def resolve_sources(spec: ShardSpec) -> list[tuple[ShardSource, ShardSet]]:
    """Every shard set of ``data.shards`` with its resolved shards."""
    try:
        sources = shard_sources(spec)
    except ValueError as err:
        raise InputError(str(err)) from err
    return [(source, resolve_shards(source.path, source.where)) for source in sources]


def total_samples(sets: list[tuple[ShardSource, ShardSet]]) -> int | None:
    """Videos in all sets together, when every set's manifest counts them."""
    totals = [shards.total_samples for _, shards in sets]
    return None if None in totals else sum(totals)


def shard_urls(spec: ShardSpec) -> list[str]:
    """Every shard URL ``data.shards`` names, set after set."""
    return [url for _, shards in resolve_sources(spec) for url in shards.urls]


def resampled_samples(sets: list[tuple[ShardSource, ShardSet]], seed: int, rank: int,
                      stats: LoaderStats) -> list:
    """The first stages of a resampled loader: tar samples drawn with replacement from the
    shards of one set, or mixed by weight from several (``WeightedMix``, with ``stats``
    counting the samples taken from each set)."""
    def samples(urls: list[str], shard_seed: int) -> list:
        return [wds.ResampledShards(urls, seed=shard_seed, deterministic=True,
                                    worker_seed=WorkerSeed(seed, rank)),
                wds.tarfile_to_samples(handler=SkipHandler(stats))]

    if len(sets) == 1 and not sets[0][0].name:
        return samples(sets[0][1].urls, seed)
    pipelines = [wds.DataPipeline(*samples(shards.urls, _set_seed(seed, index)))
                 for index, (_, shards) in enumerate(sets)]
    return [WeightedMix(pipelines, [source.weight for source, _ in sets], stats)]


def _set_seed(seed: int, index: int) -> int:
    """Shard-resampling seed of set ``index`` of a mixture (distinct per set)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class WeightedMix(IterableDataset):
    """Samples from endless ``sources`` by smooth weighted round-robin (module docstring);
    ``stats.add_taken(k)`` counts each sample taken from source ``k``."""

    def __init__(self, sources: list[Iterable[dict]], weights: list[float],
                 stats: LoaderStats | None = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        total = float(sum(weights))
        self.sources, self.stats = sources, stats
        self.weights = np.asarray(weights, dtype=np.float64) / total

    def __iter__(self) -> Iterator[dict]:
        iterators = [iter(source) for source in self.sources]
        credit = np.zeros_like(self.weights)
        while True:
            credit += self.weights
            index = int(np.argmax(credit))
            credit[index] -= 1.0
            try:
                sample = next(iterators[index])
            except StopIteration:  # resampled sources are endless; a finite one ends the mix
                return
            if self.stats is not None:
                self.stats.add_taken(index)
            yield sample
