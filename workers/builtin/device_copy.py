"""Host values to the device for a step without waiting: on CUDA through pinned memory, so the
copy is queued on the stream like a kernel. For a copy from pageable memory (torch.tensor(...).to(
"cuda")) the driver may synchronize with the stream to stage it (CUDA's "API synchronization
behavior"), i.e. wait for the step in flight, which undoes the overlap loop's launch-ahead."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence[int | float | bool] | list[list[int]] | np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device` (ordered before the kernels that read it on the same
    stream); on CPU a plain tensor."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    if isinstance(values, np.ndarray):  # torch.tensor cannot pin what it builds from numpy
        host = torch.empty(values.shape, dtype=dtype, device="cpu", pin_memory=True)
        host.copy_(torch.from_numpy(values))
        return host.to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device="cpu", pin_memory=True).to(device, non_blocking=True)
