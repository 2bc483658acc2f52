"""Layer 4: the SAE — model and config, foreign formats, training (trainer, checkpoints, metrics), the training
run's format, spliced evaluation.
"""
