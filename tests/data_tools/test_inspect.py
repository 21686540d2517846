"""inspect: the summary counts what the shards hold."""
from __future__ import annotations

import json

from data_tools.__main__ import main
from data_tools.inspect_shards import format_summary, summarize_shards
from data_tools.manifest import load_manifest
from data_tools.video_io import probe_video
from tests.data_tools.build_fixtures import GOOD_LIST, built_set, video_dir  # noqa: F401


def test_summary_matches_sources_and_manifest(built_set, video_dir):
    infos = [probe_video(video_dir / line.split()[0]) for line in GOOD_LIST.splitlines()]
    summary = summarize_shards(built_set)
    assert summary["samples"] == load_manifest(built_set).num_samples == len(infos)
    assert summary["classes"] == {"0": 1, "1": 3}
    assert summary["duration_s"]["total"] == sum(round(i.duration, 6) for i in infos)
    assert summary["num_frames"]["max"] == max(i.num_frames for i in infos)
    assert summary["resolutions"] == {"176x144": 3, "640x272": 1}
    assert sum(summary["fps"].values()) == len(infos)
    text = format_summary(summary)
    assert "samples     4 (manifest: 4 samples, 2 classes, 0 rejects)" in text
    assert "176x144: 3" in text


def test_cli_prints_text_and_json(built_set, capsys):
    assert main(["inspect", str(built_set)]) == 0
    assert "classes     2" in capsys.readouterr().out
    assert main(["inspect", str(built_set / "set-000001.tar"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 1 and summary["samples"] == 2
