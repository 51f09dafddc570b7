"""Training entrypoints: the StyleGAN2 generator (``likeness train-generator``)."""
