"""Annotation files for detection: AVA CSVs, proposals, label maps and action segments.

Every malformed entry raises :class:`AnnotationError` naming the file and line (or the
shard and sample key for annotations stored inside shards), so a broken row in a file of
a million rows can be found and fixed.

Formats (AVA layout; boxes are ``x1, y1, x2, y2`` normalised to [0, 1]):
- ground truth CSV: ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` (one row per
  actor and action; ``person_id`` may be missing, then actors are identified by their box);
- proposals CSV: ``video_id,timestamp,x1,y1,x2,y2,score`` (person boxes);
- label map: AVA ``.pbtxt`` (``item { name: "..." id: N }``); action ids are mapped to
  contiguous class indices in file order;
- segments CSV: ``video_id,start_s,end_s,label`` with ``label`` a class name.
"""
from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runtime.io import atomic_write_text

FrameKey = tuple[str, float]  # (video_id, timestamp in seconds)


class AnnotationError(ValueError):
    """A malformed annotation; the message starts with ``file:line:``."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class LabelMap:
    """Dataset action ids (e.g. AVA's 1..80) <-> contiguous class indices."""

    action_ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.action_ids)

    def __post_init__(self):
        object.__setattr__(self, "_index",
                           {action_id: i for i, action_id in enumerate(self.action_ids)})

    def index(self, action_id: int) -> int | None:
        """Class index of a dataset action id, or None when the map does not list it."""
        return self._index.get(action_id)

    def to_pbtxt(self) -> str:
        return "".join(f'item {{\n  name: "{name}"\n  id: {i}\n}}\n'
                       for i, name in zip(self.action_ids, self.names))


@dataclass
class FrameAnnotation:
    """Actors of one keyframe: ``boxes (M, 4)`` float32 and multi-hot ``labels (M, K)`` bool."""

    boxes: Tensor
    labels: Tensor

    def to_rows(self) -> tuple[Tensor, Tensor]:
        """One ``(box, class)`` row per actor and action, the metric's ground-truth form."""
        actor, cls = torch.nonzero(self.labels, as_tuple=True)
        return self.boxes[actor], cls


_ITEM = re.compile(r"item\s*\{(?P<body>[^}]*)\}", re.S)
_NAME = re.compile(r'name\s*:\s*"(?P<v>[^"]*)"')
_ID = re.compile(r"\bid\s*:\s*(?P<v>-?\d+)")


def read_label_map(path: str | Path) -> LabelMap:
    """Parse an AVA label map ``.pbtxt``."""
    text = Path(path).read_text()
    ids: list[int] = []
    names: list[str] = []
    for item in _ITEM.finditer(text):
        where = f"{path}:{text.count(chr(10), 0, item.start()) + 1}"
        name, action_id = _NAME.search(item["body"]), _ID.search(item["body"])
        if name is None or action_id is None:
            raise AnnotationError(where, "label map item needs both `name: \"...\"` and `id: N`")
        if int(action_id["v"]) in ids:
            raise AnnotationError(where, f"duplicate action id {action_id['v']}")
        ids.append(int(action_id["v"]))
        names.append(name["v"])
    if not ids:
        raise AnnotationError(f"{path}:1", "no `item { name: ... id: ... }` entries found")
    return LabelMap(tuple(ids), tuple(names))


def read_ava_annotations(
    path: str | Path, label_map: LabelMap, unknown_actions: str = "error"
) -> dict[FrameKey, FrameAnnotation]:
    """Ground-truth CSV grouped by keyframe and actor.

    Args:
        unknown_actions: ``"error"`` (default) or ``"skip"`` for action ids that are not in
            the label map (AVA's 80-class files evaluated with the 60-class map).
    """
    if unknown_actions not in ("error", "skip"):
        raise ValueError(f"unknown_actions must be 'error' or 'skip', got {unknown_actions!r}")
    actors: dict[FrameKey, dict[object, tuple[list[float], set[int]]]] = {}
    for where, row in _csv_rows(path, min_fields=7, max_fields=8):
        key = (row[0], _number(row[1], where, "timestamp"))
        box = _box(row[2:6], where)
        action_id = _integer(row[6], where, "action_id")
        cls = label_map.index(action_id)
        if cls is None:
            if unknown_actions == "skip":
                actors.setdefault(key, {})
                continue
            raise AnnotationError(where,
                                  f"action id {action_id} is not in the label map "
                                  f"({len(label_map.action_ids)} ids)")
        has_id = len(row) == 8 and row[7] != ""
        actor = _integer(row[7], where, "person_id") if has_id else tuple(box)
        _, classes = actors.setdefault(key, {}).setdefault(actor, (box, set()))
        classes.add(cls)
    out = {}
    for key, by_actor in actors.items():
        labels = torch.zeros(len(by_actor), label_map.num_classes, dtype=torch.bool)
        for i, (_, classes) in enumerate(by_actor.values()):
            labels[i, sorted(classes)] = True
        boxes = torch.tensor([box for box, _ in by_actor.values()],
                             dtype=torch.float32).reshape(-1, 4)
        out[key] = FrameAnnotation(boxes, labels)
    return out


def read_proposals(path: str | Path) -> dict[FrameKey, tuple[Tensor, Tensor]]:
    """Person proposals CSV -> keyframe -> ``(boxes (K, 4), scores (K,))``."""
    rows: dict[FrameKey, tuple[list[list[float]], list[float]]] = {}
    for where, row in _csv_rows(path, min_fields=7, max_fields=7):
        key = (row[0], _number(row[1], where, "timestamp"))
        boxes, scores = rows.setdefault(key, ([], []))
        boxes.append(_box(row[2:6], where))
        scores.append(_number(row[6], where, "score"))
    return {
        key: (torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32))
        for key, (boxes, scores) in rows.items()
    }


def write_ava_csv(path: str | Path, rows: Sequence[Sequence[object]]) -> None:
    """Write CSV rows atomically (floats with 6 significant digits)."""

    def cell(value: object) -> str:
        return format(value, ".6g") if isinstance(value, float) else str(value)

    atomic_write_text(Path(path), "".join(",".join(cell(v) for v in row) + "\n" for row in rows))


def read_segments_csv(path: str | Path,
                      class_names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Segments CSV -> video -> ``(segments (M, 2) seconds, labels (M,))``."""
    rows: dict[str, tuple[list[list[float]], list[int]]] = {}
    for where, row in _csv_rows(path, min_fields=4, max_fields=4):
        segments, labels = rows.setdefault(row[0], ([], []))
        segments.append(_segment(row[1], row[2], where))
        labels.append(_class_index(row[3], class_names, where))
    return {video: _segment_tensors(s, lab) for video, (s, lab) in rows.items()}


def parse_segments(
    raw: object, class_names: Sequence[str], where: str, duration: float | None = None
) -> tuple[Tensor, Tensor]:
    """Validate a shard sample's ``segments`` field: ``[[start_s, end_s, label], ...]``.

    ``label`` is a class name or index; ``where`` names the shard and key for errors.
    """
    if not isinstance(raw, list):
        raise AnnotationError(where,
                              "`segments` must be a list of [start_s, end_s, label], got "
                              f"{type(raw).__name__}")
    segments, labels = [], []
    for i, entry in enumerate(raw):
        at = f"{where}: segments[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise AnnotationError(at, f"expected [start_s, end_s, label], got {entry!r}")
        segment = _segment(entry[0], entry[1], at)
        if duration is not None and segment[1] > duration + 1e-3:
            raise AnnotationError(
                at, f"segment ends at {segment[1]} s after the video's duration {duration} s")
        segments.append(segment)
        labels.append(_class_index(entry[2], class_names, at))
    return _segment_tensors(segments, labels)


def _csv_rows(path: str | Path, min_fields: int, max_fields: int):
    """Yield ``(where, fields)`` for non-empty lines, skipping a header starting with
    ``video_id``."""
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path}:{line_no}"
            row = [cell.strip() for cell in row]
            if line_no == 1 and row[0] == "video_id":
                continue
            if not min_fields <= len(row) <= max_fields:
                expected = (str(min_fields) if min_fields == max_fields
                            else f"{min_fields}-{max_fields}")
                raise AnnotationError(where, f"expected {expected} comma-separated fields, got "
                                             f"{len(row)}: {','.join(row)}")
            yield where, row


def _number(text: object, where: str, what: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AnnotationError(where, f"{what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(where, f"{what} is not finite: {text!r}")
    return value


def _integer(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AnnotationError(where, f"{what} is not an integer: {text!r}") from None


def _box(fields: Sequence[str], where: str) -> list[float]:
    x1, y1, x2, y2 = (_number(v, where, name) for v, name in zip(fields, ("x1", "y1", "x2", "y2")))
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise AnnotationError(
            where, f"box {x1, y1, x2, y2} is outside [0, 1] (boxes must be normalised x1,y1,x2,y2)")
    if not (x1 < x2 and y1 < y2):
        raise AnnotationError(where, f"box {x1, y1, x2, y2} is empty: need x1 < x2 and y1 < y2")
    return [x1, y1, x2, y2]


def _segment(start: object, end: object, where: str) -> list[float]:
    start_s, end_s = _number(start, where, "start_s"), _number(end, where, "end_s")
    if start_s < 0:
        raise AnnotationError(where, f"segment starts before 0: start_s={start_s}")
    if end_s <= start_s:
        raise AnnotationError(where,
                              f"segment ends before it starts: start_s={start_s}, end_s={end_s}")
    return [start_s, end_s]


def _class_index(label: object, class_names: Sequence[str], where: str) -> int:
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(class_names):
            return label
        raise AnnotationError(where, f"label index {label} is outside [0, {len(class_names)})")
    if label in class_names:
        return list(class_names).index(label)
    raise AnnotationError(where, f"unknown label {label!r}; known labels: {', '.join(class_names)}")


def _segment_tensors(segments: list[list[float]], labels: list[int]) -> tuple[Tensor, Tensor]:
    return (torch.tensor(segments, dtype=torch.float32).reshape(-1, 2),
            torch.tensor(labels, dtype=torch.long))
