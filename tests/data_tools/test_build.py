"""Shard building on real mp4 files: list / CSV / folder inputs, rejects, keys, caps,
parallel writing, re-encoding, manifest and shard resolution."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from dataclasses import replace

import av
import decord
import numpy as np
import pytest
import webdataset as wds

from data_tools.build import (MAX_KEY_LENGTH, ReencodeOptions, build_shards, parse_size,
                              plan_shards, sanitize_keys)
from data_tools.config import DataConfig
from data_tools.decode import open_video
from data_tools.loader import build_loader
from data_tools.manifest import load_manifest, resolve_shards
from data_tools.sources import read_sources
from data_tools.verify import verify_shards
from data_tools.video_io import probe_video, reencode_video
from runtime.errors import InputError
from tests.data_tools.build_fixtures import (GOOD_LIST, built_set, video_dir,  # noqa: F401
                                             write_list)


def read_samples(shard_dir: Path) -> dict[str, dict]:
    """Every sample of a shard set, read back with webdataset: key -> {mp4, json, __url__}."""
    urls = resolve_shards(shard_dir)
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = {"mp4": sample["mp4"], "json": json.loads(sample["json"]),
                                      "url": sample["__url__"]}
    return samples


def test_list_build_packs_original_bytes_with_metadata(built_set, video_dir):
    manifest = load_manifest(built_set)
    samples = read_samples(built_set)
    by_source = {s["json"]["source"]: s for s in samples.values()}
    assert sorted(by_source) == sorted(line.split()[0] for line in GOOD_LIST.splitlines())
    assert manifest.num_samples == len(samples) == 4
    assert [s.num_samples for s in manifest.shards] == [2, 2]
    assert manifest.classes == ["0", "1"] and manifest.extra["class_counts"] == [1, 3]
    for source, sample in by_source.items():
        assert sample["mp4"] == (video_dir / source).read_bytes()  # untouched
        meta = sample["json"]
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        assert meta["num_frames"] == len(reader)
        assert (meta["height"], meta["width"]) == reader[0].shape[:2]
        assert meta["fps"] == pytest.approx(reader.get_avg_fps(), rel=1e-6)
        assert meta["duration"] == pytest.approx(meta["num_frames"] / meta["fps"], rel=1e-4)
        assert meta["label"] == (0 if source == "bikes.mp4" else 1)
        assert meta["label_name"] == manifest.classes[meta["label"]]
    # Each shard holds exactly the samples the manifest says.
    per_url = {}
    for sample in samples.values():
        per_url[Path(sample["url"]).name] = per_url.get(Path(sample["url"]).name, 0) + 1
    assert per_url == {s.url: s.num_samples for s in manifest.shards}
    assert manifest.extra["total_bytes"] == sum((built_set / s.url).stat().st_size
                                               for s in manifest.shards)


def test_unreadable_videos_are_rejected_with_reasons(video_dir, tmp_path):
    listing = write_list(tmp_path, GOOD_LIST + "cut.mp4 0\nnotes.mp4 1\nmissing.mp4 0\n")
    manifest = build_shards(read_sources(listing, root=video_dir), tmp_path / "out",
                            progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text()
               .splitlines()]
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert sorted(reasons) == ["cut.mp4", "missing.mp4", "notes.mp4"]
    assert "not found" in reasons["missing.mp4"]
    assert all(reason for reason in reasons.values())
    assert manifest.num_samples == 4 and manifest.extra["num_rejects"] == 3
    packed = {s["json"]["source"] for s in read_samples(tmp_path / "out").values()}
    assert not packed & set(reasons)


def test_keys_have_no_dots_and_are_unique(video_dir, tmp_path):
    # The same file twice and a dotted name: keys must stay unique and dot-free so that
    # webdataset groups .mp4 and .json of each sample together.
    listing = write_list(tmp_path, "car.phone.v2.mp4 1\ncar.phone.v2.mp4 1\nbikes.mp4 0\n")
    build_shards(read_sources(listing, root=video_dir), tmp_path / "out", progress=False)
    samples = read_samples(tmp_path / "out")
    assert len(samples) == 3
    assert all("." not in key for key in samples)
    assert all(set(s) >= {"mp4", "json"} for s in samples.values())


def test_sanitize_keys():
    sources = ["a/b.c.mp4", "a_b_c.mp4", "a/b.c.mp4", "a_b_c_1.mp4", "x y/é.avi", "..mp4",
               "v" * 200 + ".mp4", "v" * 200 + ".mkv"]
    keys = sanitize_keys(sources)
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert all(0 < len(k) <= MAX_KEY_LENGTH for k in keys)
    assert keys[0] == "a_b_c" and keys[3] == "a_b_c_1"  # a natural key keeps its name
    assert keys[1] != keys[0] and keys[2] not in (keys[0], keys[3])
    assert sanitize_keys(sources) == keys  # deterministic


def test_csv_with_names_and_segments(video_dir, tmp_path):
    (tmp_path / "ann.csv").write_text(
        "path,label,start,end\n"
        "bikes.mp4,cycling,1.0,3.5\n"
        "carphone_pristine.mp4,talking,,\n"
        "carphone_distorted.mp4,talking,0.5,99\n")
    manifest = build_shards(read_sources(tmp_path / "ann.csv", root=video_dir),
                            tmp_path / "out", progress=False)
    assert manifest.classes == ["cycling", "talking"]
    metas = {s["json"]["source"]: s["json"] for s in read_samples(tmp_path / "out").values()}
    bikes = metas["bikes.mp4"]
    assert (bikes["label"], bikes["label_name"]) == (0, "cycling")
    assert (bikes["start"], bikes["end"]) == (1.0, 3.5)
    assert "start" not in metas["carphone_pristine.mp4"]
    distorted = metas["carphone_distorted.mp4"]
    assert distorted["end"] == pytest.approx(distorted["duration"])  # clamped to the video


def test_bad_annotation_lines_name_the_file(tmp_path):
    bad = write_list(tmp_path, "a.mp4 0\nb.mp4 walking\n")
    with pytest.raises(ValueError, match=r"list\.txt:2"):
        read_sources(bad)
    (tmp_path / "x.csv").write_text("file,label\na.mp4,0\n")
    with pytest.raises(ValueError, match=r"x\.csv.*'path' column"):
        read_sources(tmp_path / "x.csv")


def test_folder_source_labels_from_subfolders(video_dir, tmp_path):
    for cls, name in (("cycling", "bikes"), ("talking", "carphone_pristine"),
                      ("talking", "carphone_distorted")):
        (tmp_path / "videos" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(video_dir / f"{name}.mp4", tmp_path / "videos" / cls)
    sources = read_sources(tmp_path / "videos")
    assert sources.classes == ["cycling", "talking"]
    assert sorted((i.source, i.label) for i in sources.items) == [
        ("cycling/bikes.mp4", 0), ("talking/carphone_distorted.mp4", 1),
        ("talking/carphone_pristine.mp4", 1)]


def test_plan_shards_respects_both_caps():
    sizes = [100, 200, 300, 5000, 100, 100, 100]
    plan = plan_shards(sizes, max_count=2, max_size=2048)
    assert [list(r) for r in plan] == [[0, 1], [2], [3], [4, 5], [6]]
    assert plan_shards(sizes, max_count=3, max_size=1 << 20) == [range(0, 3), range(3, 6),
                                                                  range(6, 7)]
    assert parse_size("1G") == 1 << 30 and parse_size("500M") == 500 << 20
    assert parse_size("64k") == 65536 and parse_size("123") == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")


def test_size_cap_splits_shards(video_dir, tmp_path):
    listing = write_list(tmp_path, GOOD_LIST)
    cap = 700_000  # bikes (~0.5 MB) and carphone (~0.6 MB) cannot share a shard
    manifest = build_shards(read_sources(listing, root=video_dir), tmp_path / "out",
                            max_size=cap, progress=False)
    sizes = [(tmp_path / "out" / s.url).stat().st_size for s in manifest.shards]
    assert len(manifest.shards) >= 3
    assert all(size <= cap for size in sizes), sizes
    assert manifest.num_samples == 4


def test_parallel_build_writes_the_same_shards(built_set, video_dir, tmp_path):
    """Two worker processes give byte-identical shards to the single-process build."""
    sources = read_sources(write_list(tmp_path, GOOD_LIST), root=video_dir)
    manifest = build_shards(sources, tmp_path / "out", prefix="set", max_count=2, workers=2,
                            progress=False)
    for shard in manifest.shards:
        assert (tmp_path / "out" / shard.url).read_bytes() == (built_set / shard.url).read_bytes()
    leftovers = [p.name for p in (tmp_path / "out").iterdir()
                 if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_existing_shard_set_needs_overwrite(built_set, video_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built_set, out)
    sources = read_sources(write_list(tmp_path, "bikes.mp4 0\n"), root=video_dir)
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        build_shards(sources, out, prefix="set", progress=False)
    manifest = build_shards(sources, out, prefix="set", overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["set-000000.tar"]
    assert manifest.num_samples == 1


def test_reencode_decodes_with_decord_and_short_keyframe_interval(video_dir, tmp_path):
    listing = write_list(tmp_path, "bikes.mp4 0\ncarphone_pristine.mp4 1\n")
    opts = ReencodeOptions(short_side=48, gop=6)
    manifest = build_shards(read_sources(listing, root=video_dir), tmp_path / "out",
                            reencode=opts, progress=False)
    assert manifest.extra["reencode"]["gop"] == 6
    assert manifest.extra["frame_stride"] == opts.frame_stride == 4  # the default
    for sample in read_samples(tmp_path / "out").values():
        meta = sample["json"]
        original = probe_video(video_dir / meta["source"])
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        assert meta["frame_stride"] == 4
        assert meta["fps"] == pytest.approx(original.fps / 4)
        assert len(reader) == meta["num_frames"] == -(-original.num_frames // 4)
        frame = reader[len(reader) - 1].asnumpy()
        assert min(frame.shape[:2]) == 48 and frame.shape[:2] == (meta["height"], meta["width"])
        assert meta["width"] / meta["height"] == pytest.approx(
            original.width / original.height, rel=0.05)
        keys = reader.get_key_indices()
        assert keys[0] == 0 and np.diff(keys + [len(reader)]).max() <= opts.gop


def test_reencode_resamples_and_cuts(video_dir):
    data = reencode_video(video_dir / "bikes.mp4", short_side=32, gop=4, fps=10, start=2.0,
                          end=4.0)
    info = probe_video(data)
    assert (info.fps, info.num_frames, info.height) == (10.0, 20, 32)
    # The first output frame is the source frame at 2.0 s (frame 50 at 25 fps).
    out_first = decord.VideoReader(io.BytesIO(data))[0].asnumpy().astype(float)
    src = decord.VideoReader(str(video_dir / "bikes.mp4"), width=info.width, height=32)
    errors = [np.abs(src[i].asnumpy() - out_first).mean() for i in (40, 50, 60)]
    assert int(np.argmin(errors)) == 1


def test_resolve_shards_forms(built_set, tmp_path):
    names = ["set-000000.tar", "set-000001.tar"]
    expected = [str(built_set / n) for n in names]
    assert resolve_shards(built_set) == expected
    assert resolve_shards(built_set / "manifest.json") == expected
    assert resolve_shards(str(built_set / "set-*.tar")) == expected
    assert resolve_shards(str(built_set / "set-{000000..000001}.tar")) == expected
    assert resolve_shards(f"{expected[1]}::{expected[0]}") == expected[::-1]
    assert resolve_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(FileNotFoundError, match="no shards"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "manifest.json").write_text('{"shards": [{"url": "a.tar"}]}')
    with pytest.raises(ValueError, match="manifest.json.*num_samples"):
        load_manifest(tmp_path)


def test_tar_members_are_key_dot_ext(built_set):
    with tarfile.open(built_set / "set-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 4
    assert all(name.count(".") == 1 and name.split(".")[1] in ("json", "mp4") for name in names)


def test_reencode_size_shrinks_but_never_enlarges():
    from data_tools.video_io import scaled_size

    assert scaled_size(1280, 720, 320) == (568, 320)   # shorter side brought down to 320
    assert scaled_size(176, 144, 320) == (176, 144)    # already small: kept, not enlarged
    assert scaled_size(175, 143, 320) == (176, 144)    # odd sizes rounded to even for yuv420p


def test_frame_stride_keeps_every_nth_frame_and_the_loader_follows_it(clip_tools, tmp_path):
    """A set stored with frame_stride 4 holds source frames 0, 4, 8, ...; the loader reads
    sampling_rate 4 as consecutive stored frames and refuses a rate that is not a multiple."""
    frames = clip_tools.synthetic_frames(num_frames=20)
    source = tmp_path / "src" / "clip.mp4"
    source.parent.mkdir()
    source.write_bytes(clip_tools.encode_h264(frames, gop=20))
    data = reencode_video(source, short_side=48, gop=16, crf=10, frame_stride=4)
    stored = open_video(data, "pyav")
    assert stored.num_frames == 5 and stored.fps == pytest.approx(25 / 4)
    np.testing.assert_array_equal(
        clip_tools.frame_index_of(stored.get_frames(range(5)).numpy()), [0, 4, 8, 12, 16])

    build_shards(read_sources(tmp_path / "src"), tmp_path / "out", progress=False,
                 reencode=ReencodeOptions(short_side=48, gop=16, crf=10, frame_stride=4))
    cfg = DataConfig(shards=str(tmp_path / "out"), num_frames=4, sampling_rate=4,
                     input_size=48, patch_size=8, tubelet_size=2, num_workers=0, crop="center",
                     backend="pyav")
    batch = next(iter(build_loader(cfg, "eval", rank=0, world_size=1)))
    video = batch["video"][0].permute(1, 2, 3, 0).numpy()  # uint8 (T, H, W, 3)
    np.testing.assert_array_equal(clip_tools.frame_index_of(video), [0, 4, 8, 12])
    with pytest.raises(InputError, match=r"clip.*every 4th frame.*data\.sampling_rate=2"):
        next(iter(build_loader(replace(cfg, sampling_rate=2), "eval", rank=0, world_size=1)))


def test_sources_stored_as_they_are_keep_their_container_extension(clip_tools, tmp_path):
    """A Matroska or AVI source packed without re-encoding is stored as <key>.mkv / <key>.avi
    (not .mp4), and the loader and verify read it."""
    frames = clip_tools.synthetic_frames(num_frames=8)
    (tmp_path / "src").mkdir()
    for name, fmt, codec in (("a.mkv", "matroska", "libx264"), ("b.avi", "avi", "mpeg4"),
                             ("c.mp4", "mp4", "libx264")):
        with av.open(str(tmp_path / "src" / name), mode="w", format=fmt) as container:
            stream = container.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
    manifest = build_shards(read_sources(tmp_path / "src"), tmp_path / "out", progress=False)
    with tarfile.open(tmp_path / "out" / manifest.shards[0].url) as tar:
        members = sorted(n for n in tar.getnames() if not n.endswith(".json"))
    assert members == ["a.mkv", "b.avi", "c.mp4"]
    assert verify_shards(tmp_path / "out", workers=1).ok
    cfg = DataConfig(shards=str(tmp_path / "out"), num_frames=4, sampling_rate=2,
                     input_size=32, patch_size=8, tubelet_size=2, num_workers=0, backend="pyav")
    loader = build_loader(cfg, "eval", rank=0, world_size=1)
    keys = [key for batch in loader for key in batch["key"]]
    assert sorted(keys) == ["a", "b", "c"] and loader.stats["skipped"] == 0
