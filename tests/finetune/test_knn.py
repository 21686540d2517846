"""kNN evaluation (DINO's weighted vote) against a brute-force reference, and as a probe
kind on real demo shards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from finetune.config import ProbeConfig, ProbeHeadConfig, ValConfig
from finetune.knn import knn_logits, knn_votes
from finetune.probe import run


def brute_force_votes(train, labels, queries, num_classes, k, temperature):
    """One query at a time with Python lists: cosine similarity to every row, the k most
    similar vote exp(similarity / T) for their label, votes normalised."""
    rows = []
    for query in queries.tolist():
        sims = []
        for row, label in zip(train.tolist(), labels.tolist()):
            dot = sum(a * b for a, b in zip(query, row))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in row))
            sims.append((dot / norm, label))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        rows.append([v / sum(votes) for v in votes])
    return torch.tensor(rows)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (7, 0.5), (100, 1.0)])
def test_knn_votes_match_a_brute_force_reference(k, temperature):
    gen = torch.Generator().manual_seed(k)
    train = torch.randn(40, 8, generator=gen) * torch.rand(40, 1, generator=gen) * 5
    labels = torch.randint(0, 4, (40,), generator=gen)
    queries = torch.randn(11, 8, generator=gen)
    votes = knn_votes(train, labels, queries, 4, k=k, temperature=temperature, chunk=3)
    expected = brute_force_votes(train, labels, queries, 4, min(k, 40), temperature)
    torch.testing.assert_close(votes, expected, rtol=1e-4, atol=1e-6)
    # the evaluation's softmax of the logits gives the votes back
    logits = knn_logits(train, labels, queries, 4, k=k, temperature=temperature)
    torch.testing.assert_close(logits.softmax(dim=1), expected, rtol=1e-4, atol=1e-6)


def test_knn_ignores_the_scale_of_features():
    gen = torch.Generator().manual_seed(0)
    train, queries = torch.randn(30, 6, generator=gen), torch.randn(5, 6, generator=gen)
    labels = torch.randint(0, 3, (30,), generator=gen)
    scaled = train * torch.rand(30, 1, generator=gen).add(0.1) * 100
    torch.testing.assert_close(knn_votes(train, labels, queries, 3, k=5),
                               knn_votes(scaled, labels, queries * 7, 3, k=5))


def test_knn_probe_runs_on_real_shards_without_training(tiny_model_cfg, tiny_data_cfg, tmp_path):
    cfg = ProbeConfig(model=tiny_model_cfg(), data=tiny_data_cfg("train", num_test_clips=2),
                      val=ValConfig(shards=tiny_data_cfg("val").shards, test_views=True),
                      probe=ProbeHeadConfig(kind="knn", knn_k=5), out_dir=str(tmp_path / "knn"))
    metrics = run(cfg)
    assert metrics["num_videos"] == 20 and metrics["num_views"] == 2.0
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0 and metrics["knn_k"] == 5
    saved = json.loads((Path(cfg.out_dir) / "eval" / "metrics.json").read_text())
    assert saved["probe"] == "knn" and saved["top1"] == metrics["top1"]
    assert not (Path(cfg.out_dir) / "metrics.jsonl").read_text().count('"tag": "probe"')
