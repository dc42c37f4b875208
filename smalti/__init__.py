"""Smalti: train PyTorch models fast, and govern what they learn."""

__version__ = "0.1.0"
