"""Numeric precision and compilation switches of a model on a device, shared by training,
validation and inference: ``train.amp`` (autocast dtype and gradient scaler) and
``train.compile``."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context", "compile_enabled"]


def autocast_context(device: torch.device, amp: str):
    """bf16 where the GPU supports it, fp16 otherwise (with a GradScaler), fp32 on CPU."""
    if device.type != "cuda" or amp == "fp32":
        return contextlib.nullcontext(), None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA only (on a CPU the compile of even the tiny
    model takes minutes and the step gains little), ``on`` and ``off`` say it."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"train.compile must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")
