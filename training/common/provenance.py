"""What a model's report says about how it was made: the machine and device, and the licence."""
from __future__ import annotations

import os
import platform


def machine(device=None) -> str:
    """'2-core x86_64 CPU (...)', plus the training device when it is a GPU."""
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.processor() or 'unknown'})"
    if device is not None and str(device).startswith("cuda"):
        from .device import describe
        import torch
        return f"{describe(torch.device(device))} on a {cpu}"
    return cpu


def licence(baseline: bool, real_labels: bool = False) -> str:
    aux = "an auxiliary loss on CelebAMask-HQ training photos"
    if baseline and not real_labels:
        return "trained on engine renders only"
    if baseline:
        return (f"trained on engine renders with {aux}: non-commercial research use only "
                "(CelebAMask-HQ licence)")
    return ("trained with generators fitted to CelebAMask-HQ faces"
            + (f" and {aux}" if real_labels else "")
            + ": non-commercial research use only (CelebAMask-HQ licence)")
