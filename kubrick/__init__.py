"""Kubrick: chat with gpt-oss from a terminal, served by NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
