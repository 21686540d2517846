"""``python -m data_tools``: help for every command, and build -> verify -> inspect on real
files, demo --tiny, clear errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_tools.__main__ import main
from data_tools.manifest import load_manifest
from tests.data_tools.build_fixtures import GOOD_LIST, video_dir, write_list  # noqa: F401

COMMANDS = ("build", "verify", "inspect", "demo")


def test_module_entry_point_help(capsys):
    result = subprocess.run([sys.executable, "-m", "data_tools", "build", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--reencode" in result.stdout and "--max-size" in result.stdout
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize("command,option", [("build", "--short-side"), ("verify", "--no-decode"),
                                            ("inspect", "--json"), ("demo", "--train-per-class")])
def test_every_command_has_help(command, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_build_verify_inspect(video_dir, tmp_path, capsys):
    listing = write_list(tmp_path, GOOD_LIST + "notes.mp4 1\n")
    out = tmp_path / "shards"
    assert main(["build", str(listing), "--root", str(video_dir), "--out", str(out),
                 "--prefix", "val", "--max-count", "3", "--workers", "1"]) == 0
    assert "4 samples in 2 shards (2 classes), 1 rejected" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert main(["verify", str(out), "--workers", "1"]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    capsys.readouterr()
    # A second build into the same folder is refused with a clear message.
    assert main(["build", str(listing), "--root", str(video_dir), "--out", str(out),
                 "--prefix", "val"]) == 2
    assert "already holds a shard set" in capsys.readouterr().err


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    bad = write_list(tmp_path, "clip.mp4 running\n")
    assert main(["build", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "list.txt:1" in err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no shards found" in capsys.readouterr().err


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--tiny", "--train-per-class", "1",
                 "--val-per-class", "1", "--num-frames", "8", "--workers", "1"]) == 0
    assert "train: 10 clips" in capsys.readouterr().out
    config = json.loads((out / "demo.json").read_text())
    assert (config["canvas_size"], config["num_frames"], config["train_per_class"]) == (32, 8, 1)
    assert load_manifest(out / "val").num_samples == 10
    assert (out / "classes.txt").read_text().split() == config["classes"]
