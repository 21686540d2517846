"""Video file helpers built on PyAV: metadata probing, H.264 writing and re-encoding.

Everything here accepts a video as ``bytes`` or a path and returns plain Python values or
``bytes``, so the same functions serve the shard builder, the demo generator and the loader
benchmarks. Encoded output is H.264 (libx264) in MP4, ``yuv420p``, no B-frames and a fixed
keyframe interval: the profile that decord 0.6 (bundled FFmpeg 4.1) decodes and seeks cheaply.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

VideoSource = bytes | str | Path


class VideoError(ValueError):
    """A video that cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of the first video stream. ``duration = num_frames / fps`` (seconds)."""

    fps: float
    num_frames: int
    width: int
    height: int
    duration: float
    codec: str
    container: str

    def to_dict(self) -> dict:
        return asdict(self)


def _open(src: VideoSource) -> av.container.InputContainer:
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(bytes(src)), mode="r")
        return av.open(str(src), mode="r")
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"cannot open as a video: {err}") from err


def probe_video(src: VideoSource) -> VideoInfo:
    """Read the metadata of ``src`` and check that it is usable.

    Demuxes every packet of the first video stream (cheap: no decoding) to count frames and
    catch truncated files, and decodes the first frame. Raises ``VideoError`` naming the
    problem (no video stream, unknown frame rate, truncated, no decodable frame).
    """
    with _open(src) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoError("unknown frame rate")
        num_packets, decoded_first = 0, False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                num_packets += 1
                if not decoded_first:
                    decoded_first = bool(packet.decode())
            if not decoded_first and num_packets:
                decoded_first = bool(stream.codec_context.decode(None))  # flush delayed frames
        except av.FFmpegError as err:
            raise VideoError(f"corrupt or truncated after {num_packets} packets: {err}") from err
        if num_packets == 0:
            raise VideoError("video stream has no frames")
        if stream.frames and num_packets < stream.frames:
            raise VideoError(f"truncated: header lists {stream.frames} frames, "
                             f"only {num_packets} are present")
        if not decoded_first:
            raise VideoError("no frame could be decoded")
        fps = float(rate)
        return VideoInfo(fps=fps, num_frames=num_packets, width=stream.codec_context.width,
                         height=stream.codec_context.height, duration=num_packets / fps,
                         codec=stream.codec_context.name, container=container.format.name)


def keyframe_indices(src: VideoSource) -> list[int]:
    """Indices (in presentation order) of the keyframes of the first video stream."""
    with _open(src) as container:
        stream = container.streams.video[0]
        packets = [(p.pts if p.pts is not None else p.dts, p.is_keyframe)
                   for p in container.demux(stream) if p.size]
    order = sorted(range(len(packets)), key=lambda i: packets[i][0])
    return [rank for rank, i in enumerate(order) if packets[i][1]]


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side at most ``short_side``, aspect kept, both even.

    Never up-scales: a source already smaller keeps its size (rounded to even), since
    enlarging only makes decoding slower without adding detail.
    """
    if short_side < 2:
        raise ValueError(f"short_side must be >= 2, got {short_side}")
    factor = min(1.0, short_side / min(width, height))

    def even(v: float) -> int:
        return max(2, 2 * round(v / 2))

    return even(width * factor), even(height * factor)


class _H264Writer:
    """Streams frames into an in-memory MP4 with the decord-friendly H.264 profile."""

    def __init__(self, width: int, height: int, fps: float, gop: int, crf: int, preset: str):
        if gop < 1:
            raise ValueError(f"gop must be >= 1, got {gop}")
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.time_base = 1 / rate
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        # Fixed GOP (no scene-cut keyframes) and no B-frames: decord seeks with at most
        # gop - 1 frames decoded before the target. One thread and no macroblock-tree rate
        # control: mbtree's SIMD uses approximate reciprocals (rcpps), and on this project's
        # VMs it changed the encoded bytes between runs of the same input (18/18 runs
        # identical without it, 5/9 runs with a difference with it).
        self.stream.options = {
            "crf": str(crf), "preset": preset, "threads": "1",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:mbtree=0",
        }
        self.num_frames = 0

    def add(self, frame: av.VideoFrame) -> None:
        """Encode one frame; it must already be yuv420p at the stream's size (see
        ``_to_yuv420p``), so the encoder does no conversion of its own."""
        frame.pts = self.num_frames
        frame.time_base = self.time_base
        frame.pict_type = av.video.frame.PictureType.NONE
        self.container.mux(self.stream.encode(frame))
        self.num_frames += 1

    def finish(self) -> bytes:
        self.container.mux(self.stream.encode(None))
        self.container.close()
        if self.num_frames == 0:
            raise VideoError("no frames to encode")
        return self.buffer.getvalue()


def _to_yuv420p(frame: av.VideoFrame, width: int | None = None, height: int | None = None,
               interpolation: str = "AREA") -> av.VideoFrame:
    # One thread: swscale's default slice threading has been seen to give run-to-run
    # differences (PyAV 18 / FFmpeg 8), which would make the encoded bytes non-reproducible.
    return frame.reformat(width=width, height=height, format="yuv420p",
                          interpolation=interpolation, threads=1)


def write_mp4(frames: np.ndarray, fps: float, gop: int = 8, crf: int = 18,
              preset: str = "medium") -> bytes:
    """Encode ``frames`` (uint8, (T, H, W, 3) RGB, H and W even) as H.264 MP4 bytes.

    Deterministic: the same frames and settings give the same bytes.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    writer = _H264Writer(width, height, fps, gop, crf, preset)
    for rgb in frames:
        writer.add(_to_yuv420p(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb),
                                                          format="rgb24")))
    return writer.finish()


def _timed_frames(container: av.container.InputContainer, start: float | None
                  ) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames of the first video stream with their time in seconds from stream start."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    step = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
    if start:
        container.seek(int((start + origin) / stream.time_base), stream=stream, backward=True)
    for index, frame in enumerate(container.decode(stream)):
        t = frame.time - origin if frame.time is not None else index * step
        yield t, frame


def reencode_video(src: VideoSource, short_side: int = 320, gop: int = 16,
                   fps: float | None = None, start: float | None = None,
                   end: float | None = None, crf: int = 23, preset: str = "veryfast",
                   frame_stride: int = 1) -> bytes:
    """Re-encode ``src`` to H.264 MP4 bytes with the shorter side reduced to ``short_side``.

    ``gop`` is the keyframe interval in stored frames (random access then costs at most
    ``gop - 1`` extra decoded frames); ``fps`` resamples the frame rate (frames repeated or
    dropped, nearest earlier frame), default: keep the source's average rate;
    ``frame_stride`` keeps every ``frame_stride``-th frame of that rate (frames 0, s, 2s, ...;
    stored rate ``fps / frame_stride``); ``start``/``end`` (seconds) cut the segment
    ``[start, end)``. Audio and other streams are dropped.
    """
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    with _open(src) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        out_fps = (float(fps) if fps else src_fps) / frame_stride
        if out_fps <= 0:
            raise VideoError("unknown frame rate; pass fps")
        width, height = scaled_size(stream.codec_context.width, stream.codec_context.height,
                                    short_side)
        writer = _H264Writer(width, height, out_fps, gop, crf, preset)
        begin = start or 0.0
        stop = math.inf if end is None else end
        next_out = begin  # time of the next output frame
        held: av.VideoFrame | None = None  # the latest source frame at or before next_out

        def emit_until(limit: float) -> None:
            nonlocal next_out
            while held is not None and next_out < limit - 1e-6 and next_out < stop - 1e-6:
                writer.add(_to_yuv420p(held, width, height))
                next_out = begin + writer.num_frames / out_fps

        try:
            last_t = begin
            for t, frame in _timed_frames(container, start):
                if t >= stop - 1e-6:
                    break
                if t > begin + 1e-6:
                    emit_until(t)
                held, last_t = frame, t
            emit_until(last_t + 1.0 / (src_fps or out_fps))
        except av.FFmpegError as err:
            raise VideoError(f"decoding failed: {err}") from err
        return writer.finish()
