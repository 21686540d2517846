"""Video ViT encoders (joint / divided / space-only / mixing attention), the VideoMAE
pretraining model, and checkpoint conversion (official VideoMAE / V2, HF transformers, timm)."""
from .config import ModelConfig
from .videomae import VideoMAEPretrain, build_pretrain_model
from .vit import MODEL_REGISTRY, VideoViT, build_encoder, create_model

_CONVERT_EXPORTS = ("encoder_state_dict", "load_encoder_weights", "load_pretrain_weights")


def __getattr__(name: str):
    # models.convert is imported on first use, so `python -m models.convert` runs it only once
    if name in _CONVERT_EXPORTS:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = [
    "MODEL_REGISTRY",
    "ModelConfig",
    "VideoMAEPretrain",
    "VideoViT",
    "build_encoder",
    "build_pretrain_model",
    "create_model",
    *_CONVERT_EXPORTS,
]
