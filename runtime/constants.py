"""Numbers more than one package needs, stated once."""

# ImageNet per-channel statistics in 0-1 pixel units: the normalisation of VideoMAE, timm and
# HF checkpoints (models.ModelConfig.pixel_mean/std, data_tools.config.DataConfig.mean/std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
