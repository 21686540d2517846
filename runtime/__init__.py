"""Runtime code shared by every stage (the bottom layer: it imports no other package).

config (typed YAML configs), dist (rank discovery, process group, collectives, the job
port), logging (progress, JSON lines, TensorBoard), io (atomic writes, weights-only
loading), seed (RNG state), optim (parameter groups, schedule), engine (DeepSpeed),
checkpoint (checkpoints, data position), training (the loop's bookkeeping), preemption
(stop signals), errors (input errors and how command lines report them), constants.
"""
