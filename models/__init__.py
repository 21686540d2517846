"""Video ViT encoders (joint / divided / space-only / mixing attention), the VideoMAE
pretraining model, and checkpoint loading (official VideoMAE / V2, HF transformers, timm)."""
from .checkpoint import encoder_state_dict
from .config import ModelConfig
from .loading import load_encoder_weights, load_pretrain_weights
from .videomae import VideoMAEPretrain, build_pretrain_model
from .vit import MODEL_REGISTRY, VideoViT, build_encoder, create_model

__all__ = [
    "MODEL_REGISTRY",
    "ModelConfig",
    "VideoMAEPretrain",
    "VideoViT",
    "build_encoder",
    "build_pretrain_model",
    "create_model",
    "encoder_state_dict",
    "load_encoder_weights",
    "load_pretrain_weights",
]
