"""gradprobe: the flight recorder and failure analyst for multi-loss PyTorch models."""

__version__ = "0.1.0"
