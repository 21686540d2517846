"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Every query is compared with every training row by cosine similarity (both L2-normalised);
its ``k`` most similar rows vote for their labels with weight ``exp(similarity / T)``. The
normalised votes are the query's class probabilities; ``knn_logits`` returns their log, so
the evaluation's softmax (``finetune.evaluate``) gives the votes back and averages them over
a video's views like any classifier's scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_votes(train_features: torch.Tensor, train_labels: torch.Tensor,
              queries: torch.Tensor, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class votes ``(Q, K)``, each row summing to 1.

    train_features ``(M, D)``, train_labels ``(M,)`` long in ``[0, K)``, queries ``(Q, D)``;
    ``k`` is capped at ``M``. Queries are processed ``chunk`` at a time (the similarity
    matrix of one chunk is ``(chunk, M)``).
    """
    if len(train_features) == 0:
        raise ValueError("kNN needs at least one labelled training row")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(queries), chunk):
        query = F.normalize(queries[start:start + chunk].float().to(bank.device), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels.to(bank.device)[index], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_logits(train_features: torch.Tensor, train_labels: torch.Tensor,
               queries: torch.Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07) -> torch.Tensor:
    """``log`` of ``knn_votes`` ``(Q, K)``: softmax of a row is its votes (classes without a
    vote get ``-inf``, probability 0)."""
    return knn_votes(train_features, train_labels, queries, num_classes, k, temperature).log()
