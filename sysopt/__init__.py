"""sysopt: hardware-aware training-systems toolkit for PyTorch."""

__version__ = "0.1.0"
