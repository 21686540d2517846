"""Evaluation across two real processes (gloo): each rank scores its own shards, the main
process gathers every keyframe once and every rank gets the same metrics."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import webdataset as wds

from data_tools.video_io import write_mp4
from finetune.detection.annotations import FrameAnnotation
from finetune.detection.config import AVADataConfig
from finetune.detection.data import build_keyframe_loader
from finetune.detection.roi_head import ActionDetector, RoIActionHead
from finetune.detection.train_ava import gather_scores, predict
from models import ModelConfig, build_encoder
from runtime.dist import broadcast_from_main, free_port

CFG = AVADataConfig(num_frames=4, sampling_rate=2, input_size=32, num_workers=0, batch_size=2)


def make_model() -> ActionDetector:
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=4))
    return ActionDetector(encoder, RoIActionHead(encoder.embed_dim, num_classes=2, dropout=0.0))


def annotations(num_videos: int) -> dict:
    box = torch.tensor([[0.2, 0.2, 0.7, 0.8]])
    return {(f"v{i}", 1.0): FrameAnnotation(box, torch.tensor([[True, False]]))
            for i in range(num_videos)}


def scored(shards: list[str], rank: int, world_size: int) -> dict:
    truth = annotations(4)
    loader, _ = build_keyframe_loader(CFG, "::".join(shards), truth, False, rank, world_size,
                                      seed=0, test_boxes={k: a.boxes for k, a in truth.items()})
    return predict(make_model(), loader, torch.device("cpu"), contextlib.nullcontext, CFG)


def worker(rank: int, port: int, shards: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = scored(shards, rank, 2)
        merged = gather_scores(local)
        metrics = broadcast_from_main({"keys": len(merged)} if rank == 0 else {})
        summary = {"local": sorted(map(list, local)),
                   "merged": {f"{k[0]}@{k[1]}": s.tolist() for k, (_, s) in merged.items()},
                   "metrics": metrics}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(summary, f)
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_shards")
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(2):
        path = root / f"eval-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in (2 * shard, 2 * shard + 1):
                frames = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
                meta = {"video_id": f"v{i}", "timestamps": [1]}
                writer.write({"__key__": f"v{i}", "mp4": write_mp4(frames, 8.0),
                              "json": json.dumps(meta).encode()})
        paths.append(str(path))
    return paths


def test_two_ranks_score_disjoint_shards_and_gather_everything(two_shards, tmp_path):
    # spawn, not fork: this pytest worker may hold the process group of an in-process run
    torch.multiprocessing.start_processes(worker, args=(free_port(), two_shards, str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["local"] == [["v0", 1.0], ["v1", 1.0]]
    assert rank1["local"] == [["v2", 1.0], ["v3", 1.0]]
    assert rank1["merged"] == {} and rank0["metrics"] == rank1["metrics"] == {"keys": 4}
    single = {f"{k[0]}@{k[1]}": s.tolist() for k, (_, s) in scored(two_shards, 0, 1).items()}
    assert rank0["merged"].keys() == single.keys()
    for key, scores in single.items():
        assert torch.allclose(torch.tensor(rank0["merged"][key]), torch.tensor(scores), atol=1e-5)
