"""Action detection: spatio-temporal (AVA layout, ``python -m finetune.detect``) and temporal
(untrimmed videos, ``python -m finetune.tad``).

- metrics: ``frame_average_precision`` (AVA frame AP), ``segment_mean_average_precision``
  (ActivityNet / THUMOS segment mAP), both on the shared ``average_precision``;
- annotation files: ``annotations`` (AVA CSV, proposals, label map, segments; file:line errors);
- heads: ``RoIActionHead`` / ``ActionDetector`` and ``TemporalDetectionHead`` (+ losses,
  decoding, soft-NMS in ``tad_head``);
- ``features.sliding_window_features``: encoder features of untrimmed videos;
- ``config``: ``DetectConfig`` and ``TADConfig`` (the sections of fine-tuning);
- ``demo_data``: demo detection sets; ``train_ava`` / ``train_tad``: the training loops
  (``run(cfg)`` returns the final metrics); ``demo.run_detection_demo``.
"""
from finetune.detection.annotations import AnnotationError, FrameAnnotation, LabelMap
from finetune.detection.ava_metric import FrameAPResult, frame_average_precision
from finetune.detection.features import FeatureGrid, sliding_window_features
from finetune.detection.roi_head import ActionDetector, RoIActionHead
from finetune.detection.tad_head import TemporalDetectionHead
from finetune.detection.tad_metric import SegmentAPResult, segment_mean_average_precision

__all__ = [
    "ActionDetector",
    "AnnotationError",
    "FeatureGrid",
    "FrameAPResult",
    "FrameAnnotation",
    "LabelMap",
    "RoIActionHead",
    "SegmentAPResult",
    "TemporalDetectionHead",
    "frame_average_precision",
    "segment_mean_average_precision",
    "sliding_window_features",
]
