"""Length predictors: networks, KDE targets and losses, training with checkpoints, metrics."""

from lsdist_jax.predictor.train import Predictor, Split, load_predictor, train_and_evaluate

__all__ = ["Predictor", "Split", "load_predictor", "train_and_evaluate"]
