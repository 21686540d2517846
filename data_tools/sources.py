"""Where the videos to pack come from: a folder, a VideoMAE list or a CSV -> ``SourceSet``.

``read_sources`` dispatches on the format; each reader resolves relative paths, maps labels
(indices or class names, empty = unlabeled -1) to a class list and returns a ``SourceSet``
of ``SourceItem`` (path, label, optional ``start``/``end`` seconds, extra json fields).
``data_tools.build.build_shards`` packs a ``SourceSet`` into shards.
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from data_tools.decode import VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = tuple(f".{ext}" for ext in VIDEO_EXTENSIONS)  # what scan_folder picks up


@dataclass(frozen=True)
class SourceItem:
    """One video to pack. ``source`` is the path as written in the input (kept in the json);
    ``extra`` holds task-specific json fields."""

    path: Path
    label: int = -1
    source: str = ""
    start: float | None = None
    end: float | None = None
    extra: Mapping = field(default_factory=dict)


@dataclass
class SourceSet:
    items: list[SourceItem]
    classes: list[str]
    origin: str = ""


def read_classes(path: str | Path) -> list[str]:
    """Class names, one per line (line i is label i)."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: class names must be unique")
    return names


def _labels_from_text(raw: list[str], classes: list[str] | None, origin: str,
                      allow_indices: bool = True) -> tuple[list[int], list[str]]:
    """Map label strings to indices and a class list. All-integer labels are indices
    (unless ``allow_indices`` is False), otherwise names; '' = unlabeled (-1)."""
    given = [r for r in raw if r != ""]
    if allow_indices and all(re.fullmatch(r"-?\d+", r) for r in given):
        labels = [int(r) if r != "" else -1 for r in raw]
        if any(label < -1 for label in labels):
            raise ValueError(f"{origin}: label indices must be >= 0 (or -1 for unlabeled)")
        top = max(labels, default=-1)
        if classes is None:
            classes = [str(i) for i in range(top + 1)]
        elif top >= len(classes):
            raise ValueError(f"{origin}: label {top} but only {len(classes)} classes given")
        return labels, classes
    if classes is None:
        classes = sorted(set(given))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(given) - set(index))
    if unknown:
        raise ValueError(f"{origin}: labels not in the class list: {unknown[:5]}")
    return [index[r] if r != "" else -1 for r in raw], classes




def _resolve(root: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else root / path


def read_video_list(path: str | Path, root: str | Path | None = None,
                    classes: list[str] | None = None) -> SourceSet:
    """VideoMAE list: one ``path label`` per line (label an int index; the path may contain
    spaces, the label is the last field). Relative paths are relative to ``root`` (default:
    the list's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    paths, raw = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(f"{path}:{lineno}: expected 'path label' with an integer label, "
                             f"got {line.strip()!r}")
        paths.append(parts[0])
        raw.append(parts[1])
    labels, classes = _labels_from_text(raw, classes, str(path))
    items = [SourceItem(_resolve(root, p), label, p) for p, label in zip(paths, labels)]
    return SourceSet(items, classes, str(path))


def _optional_seconds(text: str | None, origin: str) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{origin}: expected seconds, got {text!r}") from None


def read_csv_list(path: str | Path, root: str | Path | None = None,
                  classes: list[str] | None = None) -> SourceSet:
    """CSV with a header: ``path`` (required), ``label`` (index or name, empty = unlabeled),
    ``start``/``end`` (seconds, optional). Other columns are ignored."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: the CSV header must have a 'path' column, "
                             f"got {reader.fieldnames}")
        rows = [(reader.line_num, row) for row in reader]
    raw = [(row.get("label") or "").strip() for _, row in rows]
    labels, classes = _labels_from_text(raw, classes, str(path))
    items = []
    for (lineno, row), label in zip(rows, labels):
        where = f"{path}:{lineno}"
        if not (row["path"] or "").strip():
            raise ValueError(f"{where}: empty path")
        start = _optional_seconds(row.get("start"), where)
        end = _optional_seconds(row.get("end"), where)
        if start is not None and end is not None and end <= start:
            raise ValueError(f"{where}: end ({end}) must be after start ({start})")
        items.append(SourceItem(_resolve(root, row["path"].strip()), label, row["path"].strip(),
                                start, end))
    return SourceSet(items, classes, str(path))


def scan_folder(root: str | Path, classes: list[str] | None = None) -> SourceSet:
    """Videos under ``root`` (recursive, sorted). When every video sits in a subfolder, the
    first folder level is the class (``root/<class>/.../video.mp4``); otherwise unlabeled."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    rel = [p.relative_to(root) for p in files]
    if all(len(r.parts) > 1 for r in rel):
        labels, classes = _labels_from_text([r.parts[0] for r in rel], classes, str(root),
                                            allow_indices=False)
    else:
        logger.info("%s: videos at the top level, building an unlabeled set", root)
        labels, classes = [-1] * len(files), list(classes or [])
    items = [SourceItem(p, label, r.as_posix()) for p, r, label in zip(files, rel, labels)]
    return SourceSet(items, classes, str(root))


def read_sources(source: str | Path, fmt: str = "auto", root: str | Path | None = None,
                 classes: list[str] | None = None) -> SourceSet:
    """Dispatch on ``fmt`` (``folder``, ``list``, ``csv``; ``auto``: folder if a directory,
    csv for ``.csv``, else list)."""
    source = Path(source)
    if fmt == "auto":
        fmt = "folder" if source.is_dir() else "csv" if source.suffix.lower() == ".csv" else "list"
    if fmt != "folder" and not source.is_file():
        raise FileNotFoundError(f"annotation file {source} does not exist")
    if fmt == "folder":
        return scan_folder(source, classes)
    if fmt == "csv":
        return read_csv_list(source, root, classes)
    if fmt == "list":
        return read_video_list(source, root, classes)
    raise ValueError(f"unknown source format {fmt!r} (folder, list, csv)")

