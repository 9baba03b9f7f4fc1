"""BuiltinEngine: the paged engine core (scheduler, block pool, step loop) with the torch
executor: real Llama-family models over a paged KV cache, each forward pass on the engine's
dedicated model thread."""

from __future__ import annotations

import torch

from kvbm.manager import KvBlockManager
from workers.builtin.args import BuiltinConfig
from workers.builtin.config import ModelConfig
from workers.builtin.executor import TorchExecutor
from workers.builtin.runner import ModelRunner
from workers.paged.engine import PagedEngine


class BuiltinEngine(PagedEngine[TorchExecutor]):
    name = "builtin"

    def __init__(self, config: BuiltinConfig) -> None:
        self.config = config
        executor = TorchExecutor(config, on_event=self._emit)
        super().__init__(executor, max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens)

    @property
    def model_config(self) -> ModelConfig:
        return self.executor.model_config

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    @property
    def runner(self) -> ModelRunner | None:
        return self.executor.runner

    @property
    def kvbm(self) -> KvBlockManager | None:
        return self.executor.kvbm
