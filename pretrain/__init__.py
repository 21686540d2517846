"""VideoMAE self-supervised pretraining on DeepSpeed: ``python -m pretrain --config ...``.

``pretrain.config.PretrainConfig`` is the run's typed config, ``pretrain.train.run(cfg)``
the loop, ``pretrain.visualize`` the figures.
"""
