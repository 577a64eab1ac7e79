"""enshuffle: train a neural network on volunteers' machines without giving any one of them the model."""

__version__ = "0.1.0"
