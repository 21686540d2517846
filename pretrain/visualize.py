"""Figures of a pretraining run: reconstruction grids and the loss curve (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from runtime.io import atomic_path  # noqa: E402
from runtime.logging import read_metrics  # noqa: E402


def token_mask_to_pixels(mask: torch.Tensor, grid: tuple[int, int, int], tubelet: int,
                         patch: int) -> torch.Tensor:
    """``mask (B, N)`` over tokens -> ``(B, T, H, W)`` bool over pixels (True = masked)."""
    b = mask.shape[0]
    m = mask.reshape(b, *grid)
    return (m.repeat_interleave(tubelet, 1).repeat_interleave(patch, 2)
            .repeat_interleave(patch, 3))


def to_pixels(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised ``(B, C, T, H, W)`` -> ``(B, T, H, W, C)`` floats in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (video.detach().float().cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 4, 1)


def save_reconstruction_grid(video: torch.Tensor, mask: torch.Tensor, prediction: torch.Tensor,
                             path: str | Path, grid: tuple[int, int, int], tubelet: int, patch: int,
                             mean: Sequence[float], std: Sequence[float], max_frames: int = 8,
                             title: str = "", target: torch.Tensor | None = None) -> Path:
    """PNG with one row per clip and view, for ``max_frames`` evenly spaced frames: the
    original, the masked input (hidden tubelets grey), the reconstruction target of the
    hidden tubelets (when ``target`` is given) and the model's prediction of them.

    ``video``, ``prediction`` and ``target`` are normalised ``(B, C, T, H, W)`` clips (see
    ``VideoMAEPretrain.reconstruct``: with its default ``stats="visible"`` the hidden
    tubelets of ``target`` and ``prediction`` are drawn with statistics of the visible ones
    only, so a model that learnt nothing shows flat patches), ``mask (B, N)``.
    """
    original = to_pixels(video, mean, std)
    hidden = token_mask_to_pixels(mask.cpu(), grid, tubelet, patch)[..., None]
    masked = torch.where(hidden, torch.full_like(original, 0.5), original)
    views = [("original", original), ("masked input", masked)]
    if target is not None:
        views.append(("target (hidden: normalised)", to_pixels(target, mean, std)))
    views.append(("prediction (hidden)", to_pixels(prediction, mean, std)))
    rows = [(f"clip {i}\n{name}", clip[i]) for i in range(original.shape[0])
            for name, clip in views]
    num_frames = original.shape[1]
    frames = torch.linspace(0, num_frames - 1, min(max_frames, num_frames)).round().long()
    fig, axes = plt.subplots(len(rows), len(frames), squeeze=False,
                             figsize=(1.3 * len(frames), 1.3 * len(rows)))
    for r, (label, clip) in enumerate(rows):
        for c, t in enumerate(frames.tolist()):
            ax = axes[r][c]
            ax.imshow(clip[t].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
            if r == 0:
                ax.set_title(f"t={t}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_loss_curve(metrics_file: str | Path, path: str | Path, tag: str = "train") -> Path:
    """PNG of ``loss`` against ``step`` from a metrics.jsonl (the last record wins for a
    step logged twice, e.g. after a resume), with the loss of predicting zeros (dashed, when
    logged) and the lr on a second axis."""
    by_step = {r["step"]: r for r in read_metrics(metrics_file, tag) if "loss" in r}
    if not by_step:
        raise ValueError(f"{metrics_file} has no '{tag}' records with a loss")
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(by_step[s]["loss"]) for s in steps], color="tab:blue", label="loss")
    if all("zero_pred_loss" in by_step[s] for s in steps):
        ax.plot(steps, [float(by_step[s]["zero_pred_loss"]) for s in steps], color="tab:gray",
                linestyle="--", label="predicting zeros (patch mean)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reconstruction loss (MSE)")
    if all("lr" in by_step[s] for s in steps):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [by_step[s]["lr"] for s in steps], color="tab:orange", alpha=0.6)
        lr_ax.set_ylabel("lr", color="tab:orange")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
