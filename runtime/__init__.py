"""Runtime code shared by the pretraining and fine-tuning stages.

config (typed YAML configs), dist (rank discovery, process group), logging (progress, JSON
lines, TensorBoard), io (atomic writes, weights-only loading), seed (RNG state), engine
(DeepSpeed: optimizer groups, schedule, checkpoints, resume).
"""
