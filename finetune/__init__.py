"""Recognition stage: fine-tuning, probes, feature extraction and video-level evaluation.

- ``finetune.train.run(FinetuneConfig) -> dict``: ``python -m finetune``.
- ``finetune.probe.run(ProbeConfig) -> dict``: ``python -m finetune.probe``.
- ``finetune.extract.run(ExtractConfig) -> Path``: ``python -m finetune.extract``.
- ``finetune.evaluate``: multi-view aggregation, metrics across ranks, CSV, confusion PNG.
- ``finetune.detection``: action detection heads and metrics (AVA, temporal detection).
"""
