"""Choosing the torch device."""

import torch

from orcnn_core.errors import InputError

__all__ = ["resolve_device"]


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise a torch device name."""
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: {device!r} is not a device name (auto, cpu, cuda, "
                         f"cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device} requested but CUDA is not available")
    return device
