"""The processor configs of an exported HF folder (``models.hf.export_hf``), which make
``transformers.pipeline("video-classification", model=folder)`` run on a video file.

Two files with the same settings: ``video_preprocessor_config.json``
(``VideoMAEVideoProcessor``, what the transformers 5 pipeline uses; it decodes with
torchcodec) and ``preprocessor_config.json`` (``VideoMAEImageProcessor``, what transformers 4
uses). What the processor does, next to this project's single-view evaluation (one centred
clip, centre crop; ``data_tools.clips`` ``eval`` mode):

- frames: the model's ``num_frames`` T (the pipeline passes ``config.num_frames``), taken as
  ``i * L // T`` of an L-frame video, i.e. spread over the whole video. The evaluation takes
  T frames ``data.sampling_rate`` (r) apart from the centred start ``(L - (T - 1) r - 1) // 2``
  (dense) or each segment's middle frame (segment). They agree when L = T r and r <= 2;
  with L = T r and r > 2 HF's frames come ``(r - 1) // 2`` frames earlier; otherwise they
  cover the video differently. HF's video processor has no offset or stride setting (the
  pipeline's ``frame_sampling_rate`` only reaches the image-processor path), and it refuses
  videos shorter than T frames, where the evaluation repeats the last frame.
- space: the short side resized to ``img_size``, then the centre ``img_size`` square (uint8,
  bilinear, antialiased). The evaluation crops the centred short-side square, then resizes
  it: the same pixels for square frames, the same region to within the rounding of the long
  side otherwise. A decode-time ``data.short_side`` resize is a second resize HF does not do.
- values: ``(x / 255 - mean) / std`` with the mean / std given (the run's ``data.mean`` /
  ``data.std``; by default the model's ``pixel_mean`` / ``pixel_std``).
- model: HF builds ``fc_norm`` with LayerNorm's default eps 1e-5 (ours 1e-6; no config
  field sets it): softmax scores within 2e-6 in tests/finetune/test_export_hf.py.
"""
from __future__ import annotations

from typing import Sequence

from .config import ModelConfig

VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the value HF processor configs store


def processor_configs(cfg: ModelConfig, mean: Sequence[float],
                      std: Sequence[float]) -> dict[str, dict]:
    """The two processor config files (name -> content) for clips of ``cfg``'s geometry."""
    common = {
        "do_resize": True, "size": {"shortest_edge": cfg.img_size}, "resample": PIL_BILINEAR,
        "do_center_crop": True, "crop_size": {"height": cfg.img_size, "width": cfg.img_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std],
    }
    return {
        VIDEO_PROCESSOR_FILE: {"video_processor_type": "VideoMAEVideoProcessor", **common,
                               "do_convert_rgb": True, "do_sample_frames": True,
                               "num_frames": cfg.num_frames},
        IMAGE_PROCESSOR_FILE: {"image_processor_type": "VideoMAEImageProcessor", **common},
    }
