"""histoflow: configuration-driven deep learning for digital pathology."""

__version__ = "0.1.0"
