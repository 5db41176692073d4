"""metalm: meta-learning for the pre-training and multi-task training of text encoders."""

__version__ = "0.1.0"
