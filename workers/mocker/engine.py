"""MockerEngine: the paged engine core (scheduler, real block pool, step loop) with the timing
executor in place of a forward pass. A real Engine, used to study fleets on CPUs."""

from __future__ import annotations

from kvbm.simulated import SimulatedKvbm
from workers.mocker.args import MockerConfig
from workers.mocker.executor import TimingExecutor
from workers.mocker.timing import TimingModel
from workers.paged.engine import PagedEngine


class MockerEngine(PagedEngine[TimingExecutor]):
    name = "mocker"

    def __init__(self, config: MockerConfig, timing: TimingModel | None = None) -> None:
        self.config = config
        self.timing = timing or TimingModel(speedup_ratio=config.speedup_ratio)
        executor = TimingExecutor(config, self.timing, on_event=self._emit)
        super().__init__(executor, max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens)

    @property
    def kvbm(self) -> SimulatedKvbm | None:
        return self.executor.kvbm

    @property
    def engine_time_s(self) -> float:
        """Simulated (sped-up) time of the engine's work so far: its steps, and its waits for
        simulated disk reads when nothing else could run."""
        return self.executor.engine_time_s
