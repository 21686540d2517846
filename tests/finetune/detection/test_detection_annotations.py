"""AVA CSV / proposals / label map / segment parsing, and file:line errors on bad rows."""
import pytest
import torch

from finetune.detection.annotations import (
    AnnotationError,
    parse_segments,
    read_ava_annotations,
    read_label_map,
    read_proposals,
    read_segments_csv,
    write_ava_csv,
)

LABEL_MAP = """item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "crouch/kneel"
  id: 3
}
item { name: "dance" id: 4 }
"""


@pytest.fixture
def label_map(tmp_path):
    path = tmp_path / "labels.pbtxt"
    path.write_text(LABEL_MAP)
    return read_label_map(path)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_label_map_maps_sparse_ids_to_contiguous_indices(label_map, tmp_path):
    assert label_map.names == ("bend/bow (at the waist)", "crouch/kneel", "dance")
    assert [label_map.index(i) for i in (1, 3, 4, 2)] == [0, 1, 2, None]
    again = read_label_map(write(tmp_path, "again.pbtxt", label_map.to_pbtxt()))
    assert again == label_map


def test_label_map_errors_name_the_line(tmp_path):
    bad = write(tmp_path, "dup.pbtxt", LABEL_MAP + 'item {\n  name: "again"\n  id: 3\n}\n')
    with pytest.raises(AnnotationError, match=r"dup\.pbtxt:10: duplicate action id 3"):
        read_label_map(bad)
    with pytest.raises(AnnotationError, match=r"noid\.pbtxt:1: .*id: N"):
        read_label_map(write(tmp_path, "noid.pbtxt", 'item { name: "x" }'))
    with pytest.raises(AnnotationError, match="no `item"):
        read_label_map(write(tmp_path, "empty.pbtxt", "\n"))


def test_ava_rows_are_grouped_by_keyframe_and_actor(label_map, tmp_path):
    path = write(
        tmp_path,
        "train.csv",
        "vid_a,0902,0.1,0.2,0.5,0.9,1,0\n"
        "vid_a,0902,0.1,0.2,0.5,0.9,4,0\n"  # actor 0 does two things
        "vid_a,0902,0.6,0.1,0.9,0.8,3,1\n"
        "\n"
        "vid_b,0903,0.0,0.0,1.0,1.0,4\n",  # no person_id: actor = box
    )
    frames = read_ava_annotations(path, label_map)
    assert set(frames) == {("vid_a", 902.0), ("vid_b", 903.0)}
    a = frames[("vid_a", 902)]
    assert torch.allclose(a.boxes, torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.6, 0.1, 0.9, 0.8]]))
    assert a.labels.tolist() == [[True, False, True], [False, True, False]]
    boxes, labels = a.to_rows()
    assert labels.tolist() == [0, 2, 1]
    assert torch.equal(boxes[0], boxes[1])


@pytest.mark.parametrize(
    "row, problem",
    [
        ("vid,1,0.1,0.2,1.5,0.9,1,0", r"outside \[0, 1\]"),
        ("vid,1,-0.1,0.2,0.5,0.9,1,0", r"outside \[0, 1\]"),
        ("vid,1,0.5,0.2,0.5,0.9,1,0", "empty"),
        ("vid,1,0.1,0.2,0.5,0.9,2,0", "action id 2 is not in the label map"),
        ("vid,1,0.1,0.2,0.5,zero,1,0", "y2 is not a number"),
        ("vid,1,0.1,0.2,0.5,0.9,1.5,0", "action_id is not an integer"),
        ("vid,1,0.1,0.2,0.5", "expected 7-8 comma-separated fields, got 5"),
    ],
)
def test_malformed_ava_rows_name_file_and_line(label_map, tmp_path, row, problem):
    path = write(tmp_path, "gt.csv", "vid,1,0.1,0.2,0.5,0.9,1,0\n" + row + "\n")
    with pytest.raises(AnnotationError, match=rf"gt\.csv:2: .*{problem}"):
        read_ava_annotations(path, label_map)


def test_unknown_actions_can_be_skipped(label_map, tmp_path):
    path = write(tmp_path, "gt.csv", "vid,1,0.1,0.2,0.5,0.9,2,0\nvid,1,0.1,0.2,0.5,0.9,3,0\n")
    frames = read_ava_annotations(path, label_map, unknown_actions="skip")
    assert frames[("vid", 1.0)].labels.tolist() == [[False, True, False]]
    only_unknown = write(tmp_path, "gt2.csv", "vid,7,0.1,0.2,0.5,0.9,2,0\n")
    frame = read_ava_annotations(only_unknown, label_map, unknown_actions="skip")[("vid", 7.0)]
    assert frame.boxes.shape == (0, 4) and frame.labels.shape == (0, 3)


def test_proposals_and_csv_round_trip(tmp_path):
    path = tmp_path / "proposals.csv"
    write_ava_csv(path,
                  [("vid", 902, 0.1, 0.2, 0.5, 0.9, 0.99), ("vid", 902, 0.6, 0.1, 0.9, 0.8, 0.5)])
    proposals = read_proposals(path)
    boxes, scores = proposals[("vid", 902.0)]
    assert boxes.shape == (2, 4) and scores.tolist() == pytest.approx([0.99, 0.5])
    assert path.read_text().splitlines()[0] == "vid,902,0.1,0.2,0.5,0.9,0.99"
    bad = write(tmp_path, "bad.csv", "vid,902,0.1,0.2,0.5,0.9,0.99\nvid,902,0.1,0.2,0.5,0.9,nan\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:2: score is not finite"):
        read_proposals(bad)


def test_segments_csv(tmp_path):
    classes = ["jump", "wave"]
    path = write(tmp_path, "segments.csv",
                 "video_id,start_s,end_s,label\nv1,1.5,3.0,wave\nv1,4,9,jump\nv2,0,1,jump\n")
    segments = read_segments_csv(path, classes)
    assert segments["v1"][0].tolist() == [[1.5, 3.0], [4.0, 9.0]]
    assert segments["v1"][1].tolist() == [1, 0]
    assert segments["v2"][1].tolist() == [0]


@pytest.mark.parametrize(
    "row, problem",
    [
        ("v1,5,3,jump", "segment ends before it starts"),
        ("v1,-1,3,jump", "starts before 0"),
        ("v1,1,3,run", "unknown label 'run'"),
        ("v1,1,3", "expected 4 comma-separated fields"),
    ],
)
def test_malformed_segment_rows_name_file_and_line(tmp_path, row, problem):
    path = write(tmp_path, "seg.csv", "v1,0,1,jump\n" + row + "\n")
    with pytest.raises(AnnotationError, match=rf"seg\.csv:2: .*{problem}"):
        read_segments_csv(path, ["jump", "wave"])


def test_shard_segments_are_validated_with_their_location():
    classes = ["jump", "wave"]
    segments, labels = parse_segments([[0.5, 2.0, "wave"], [3, 4, 0]], classes,
                                      "train-000000.tar:vid7", duration=5)
    assert segments.tolist() == [[0.5, 2.0], [3.0, 4.0]] and labels.tolist() == [1, 0]
    with pytest.raises(AnnotationError,
                       match=r"train-000000\.tar:vid7: segments\[1\]: .*ends before it starts"):
        parse_segments([[0.5, 2.0, 1], [4, 3, 0]], classes, "train-000000.tar:vid7")
    with pytest.raises(AnnotationError, match=r"segments\[0\]: label index 2 is outside"):
        parse_segments([[0.5, 2.0, 2]], classes, "s.tar:k")
    with pytest.raises(AnnotationError, match="after the video's duration"):
        parse_segments([[0.5, 9.0, 1]], classes, "s.tar:k", duration=5.0)
    with pytest.raises(AnnotationError, match="must be a list"):
        parse_segments({"start": 1}, classes, "s.tar:k")

