"""cnntrain: train convolutional networks for image classification from Hydra configs."""

__version__ = "0.1.0"
