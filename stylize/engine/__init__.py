"""The algorithm: VGG19 features, losses, the optimizer. Tensors only; never imports Prefect or rich."""
