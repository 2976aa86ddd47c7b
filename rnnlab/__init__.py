"""rnnlab: the RNN language models of Dive into Deep Learning as a reproducible DVC + MLflow pipeline."""

__version__ = "0.1.0"
