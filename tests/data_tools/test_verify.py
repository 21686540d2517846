"""verify: clean sets pass; corrupt samples, truncated tars, broken keys and manifest
mismatches are reported by shard and key, and the CLI exits non-zero."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.verify import verify_shards
from tests.data_tools.build_fixtures import built_set, truncate, video_dir  # noqa: F401


@pytest.fixture
def shard_copy(built_set, tmp_path) -> Path:
    return Path(shutil.copytree(built_set, tmp_path / "shards"))


def corrupt_member(tar_path: Path, ext: str = ".mp4") -> str:
    """Zero the first 512 bytes of the first ``ext`` member in place (the tar stays
    well-formed); returns that sample's key."""
    data = bytearray(tar_path.read_bytes())
    offset = 0
    while True:
        name = data[offset:offset + 100].rstrip(b"\0").decode()
        size = int(data[offset + 124:offset + 136].rstrip(b"\0 ") or b"0", 8)
        if name.endswith(ext):
            data[offset + 512:offset + 1024] = bytes(512)
            tar_path.write_bytes(bytes(data))
            return name[:-len(ext)]
        offset += 512 + -(-size // 512) * 512


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_clean_set_passes(built_set, backend):
    report = verify_shards(built_set, backend=backend, progress=False)
    assert report.ok, report.summary()
    assert (report.num_shards, report.num_samples) == (2, 4)


def test_corrupt_sample_and_truncated_shard_are_reported(shard_copy, capsys):
    bad_key = corrupt_member(shard_copy / "set-000000.tar")
    truncate(shard_copy / "set-000001.tar", 0.6)
    report = verify_shards(shard_copy, progress=False)
    assert not report.ok
    assert report.bad_samples == [(str(shard_copy / "set-000000.tar"), bad_key)]
    assert report.bad_shards == [str(shard_copy / "set-000001.tar")]
    assert "truncated" in report.summary()
    assert main(["verify", str(shard_copy), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert bad_key in out and "set-000001.tar" in out


def test_cli_exit_code_zero_on_clean_set(built_set, capsys):
    assert main(["verify", str(built_set), "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest(shard_copy):
    # Keep only the first sample (json + mp4 members): the tar still parses, but the
    # manifest says 2 samples.
    path = shard_copy / "set-000000.tar"
    data = path.read_bytes()
    offset = 0
    for _ in range(2):
        size = int(data[offset + 124:offset + 136].rstrip(b"\0 "), 8)
        offset += 512 + -(-size // 512) * 512
    path.write_bytes(data[:offset])
    report = verify_shards(shard_copy, decode=False, progress=False)
    assert [p.reason for p in report.problems] == ["holds 1 samples, manifest says 2"]


def test_broken_keys_and_json_are_reported(built_set, tmp_path):
    sample = next(iter(wds.WebDataset(str(built_set / "set-000000.tar"), shardshuffle=False)))
    mp4, meta = sample["mp4"], json.loads(sample["json"])
    with wds.TarWriter(str(tmp_path / "odd-000000.tar"), encoder=False) as writer:
        writer.write({"__key__": "good", "mp4": mp4, "json": json.dumps(meta).encode()})
        writer.write({"__key__": "has.dot", "mp4": mp4, "json": json.dumps(meta).encode()})
        writer.write({"__key__": "nojson", "mp4": mp4})
        writer.write({"__key__": "thin", "mp4": mp4, "json": b'{"label": 0}'})
        writer.write({"__key__": "wrongcount", "mp4": mp4,
                      "json": json.dumps({**meta, "num_frames": 3}).encode()})
    report = verify_shards(str(tmp_path / "odd-*.tar"), progress=False)
    reasons = {p.key: p.reason for p in report.problems}
    assert set(reasons) == {"has", "nojson", "thin", "wrongcount"}
    assert "missing .json" in reasons["nojson"] and "lacks" in reasons["thin"]
    assert "3" in reasons["wrongcount"]
