"""Multi-view testing on real shards, and evaluation split over two real ranks (gloo)."""
from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from data_tools.clips import model_input
from data_tools.loader import build_loader
from finetune.config import eval_data_config
from finetune.evaluate import PREDICTIONS_CSV, evaluate
from models import build_encoder
from runtime.dist import free_port

NUM_CLASSES = 10
VIEWS = dict(num_test_clips=2, num_test_crops=3)


def make_model(model_cfg):
    """A random classifier whose head is large enough for the views to disagree."""
    torch.manual_seed(0)
    model = build_encoder(model_cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return model


def test_multi_view_scores_are_the_mean_of_single_views(tiny_model_cfg, tiny_data_cfg, tmp_path):
    model = make_model(tiny_model_cfg(num_classes=NUM_CLASSES))
    # batches of 4 clips cut through the 6 views of a video
    data = tiny_data_cfg("val", batch_size=4, **VIEWS)
    result = evaluate(model, build_loader(data, "test_views", 0, 1), NUM_CLASSES, data=data,
                      out_dir=tmp_path)

    single = defaultdict(dict)  # key -> view -> softmax, one clip at a time
    with torch.inference_mode():
        for batch in build_loader(tiny_data_cfg("val", batch_size=1, **VIEWS), "test_views", 0, 1):
            logits = model(model_input(batch, "cpu", data))
            single[batch["key"][0]][int(batch["view"])] = logits[0].softmax(-1)
    scores = result.scores
    assert sorted(scores.keys) == sorted(single) and len(single) == 20
    for key, score, views in zip(scores.keys, scores.scores, scores.num_views):
        assert sorted(single[key]) == list(range(6)) and int(views) == 6
        torch.testing.assert_close(score, torch.stack(list(single[key].values())).mean(0))
    # the views differ (two clips, three crops), so averaging is not a no-op
    spread = max((views - views.mean(0)).abs().max().item()
                 for views in (torch.stack(list(v.values())) for v in single.values()))
    assert spread > 1e-3


def _eval_rank(rank: int, world: int, port: int, model_cfg, data_cfg, out_dir: str) -> None:
    """One rank of a gloo evaluation, started by ``torch.multiprocessing`` with spawn."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=world)
    loader = build_loader(eval_data_config(data_cfg, data_cfg.shards, world), "test_views",
                          rank, world)
    seen: list[str] = []

    def recording(batches):
        for batch in batches:
            seen.extend(batch["key"])
            yield batch

    result = evaluate(make_model(model_cfg), recording(loader), NUM_CLASSES, data=data_cfg,
                      out_dir=out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"metrics": result.metrics, "has_scores": result.scores is not None,
                   "local_videos": len(set(seen)), "local_clips": len(seen)}, handle)


@pytest.mark.slow
def test_two_rank_evaluation_counts_each_video_once(tiny_model_cfg, tiny_data_cfg, tmp_path):
    model_cfg = tiny_model_cfg(num_classes=NUM_CLASSES)
    data_cfg = tiny_data_cfg("val", batch_size=4, **VIEWS)
    single_dir, multi_dir = tmp_path / "one", tmp_path / "two"
    loader = build_loader(eval_data_config(data_cfg, data_cfg.shards, 1), "test_views", 0, 1)
    single = evaluate(make_model(model_cfg), loader, NUM_CLASSES, data=data_cfg,
                      out_dir=single_dir)

    multi_dir.mkdir()
    mp.start_processes(_eval_rank, args=(2, free_port(), model_cfg, data_cfg, str(multi_dir)),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((multi_dir / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 reads shards 0 and 2 (8 + 4 videos), rank 1 shard 1 (8 videos)
    assert [r["local_videos"] for r in ranks] == [12, 8]
    assert [r["local_clips"] for r in ranks] == [72, 48]
    assert [r["has_scores"] for r in ranks] == [True, False]
    for name in ("top1", "top5", "mean_class_acc", "num_videos"):
        assert ranks[0]["metrics"][name] == pytest.approx(single.metrics[name], abs=1e-6)
        assert ranks[1]["metrics"][name] == pytest.approx(single.metrics[name], abs=1e-6)
    assert ranks[0]["metrics"]["num_videos"] == 20

    rows = list(csv.DictReader(io.StringIO((multi_dir / PREDICTIONS_CSV).read_text())))
    reference = list(csv.DictReader(io.StringIO((single_dir / PREDICTIONS_CSV).read_text())))
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20
    assert [(r["key"], r["pred"], r["num_views"]) for r in rows] == \
        [(r["key"], r["pred"], r["num_views"]) for r in reference]
    for row, ref in zip(rows, reference):
        assert float(row["score"]) == pytest.approx(float(ref["score"]), abs=1e-5)
    assert sorted(p.name for p in multi_dir.iterdir()) == \
        ["confusion_matrix.png", "predictions.csv", "rank0.json", "rank1.json"]
