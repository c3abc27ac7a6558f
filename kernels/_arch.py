"""The GPU architecture name the kernels' tuned tables are keyed by."""

import torch


def device_arch(device: torch.device) -> str:
    """``sm_<major><minor>`` of a CUDA device (``sm_90`` for the H100), ``cpu`` otherwise."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"
