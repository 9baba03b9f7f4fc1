"""G2: KV blocks in host memory, one preallocated tensor of slots (pinned when CUDA is present,
so device copies run asynchronously at full PCIe speed). Imports only torch."""

from __future__ import annotations

import torch


class HostStore:
    """`capacity_blocks` slots of [2 * num_layers, elements_per_layer] elements."""

    def __init__(self, capacity_blocks: int, num_layers: int, elements_per_layer: int, dtype: torch.dtype,
                 pin: bool | None = None) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        self.capacity_blocks = capacity_blocks
        self.data = torch.empty(
            (capacity_blocks, 2 * num_layers, elements_per_layer), dtype=dtype, pin_memory=pin
        )
        self.pinned = pin

    @property
    def block_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size() if self.capacity_blocks else 0
