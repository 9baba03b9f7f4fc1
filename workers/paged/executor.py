"""The step executor: what runs a PagedEngine's steps. The engine schedules and applies results;
the executor computes one scheduled batch (a forward pass and sampling on a device for the
built-in engine, a modelled duration and a seeded token stream for the mocker) and holds the KV
memory: its layout and tensors for KV transfer, and the KVBM tiers below the device pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from dynamo.wire import KvLayoutSpec, PreprocessedRequest, PromptTokenLogprob
    from kvbm.transfer.layout import KvMemory
    from workers.engine import KvbmTiers
    from workers.paged.scheduler import ScheduledBatch
    from workers.paged.sequence import Sequence


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """What a started executor holds: its KV cache's geometry and the model's limits."""

    num_blocks: int
    block_size_tokens: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()


TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


@dataclass(slots=True)
class StepResult:
    """What one step produced: one row per sampling entry of its batch (ScheduledBatch.samples),
    in batch order. Per-row extras are further per-row lists, None when no row has any; a row
    that did not ask holds None (or anything, for `logprobs`: the scheduler sends what the
    request asked for)."""

    token_ids: list[int]
    logprobs: list[float] | None = None  # the chosen token's, under the raw model distribution
    top_logprobs: list[TopLogprobs | None] | None = None  # the k most likely, raw distribution
    # With a request's first token: every prompt token's logprob (the first token's is None).
    prompt_logprobs: list[list[PromptTokenLogprob | None] | None] | None = None


class StepExecutor(Protocol):
    """Runs a PagedEngine's steps. Every method is called on the event loop's thread."""

    speedup_ratio: float  # how much faster than the hardware it models it runs (1: real time)

    @property
    def kvbm(self) -> KvbmTiers | None:
        """Lower KV tiers, when configured; `kvbm.cache` is what the scheduler admits from."""
        ...

    async def start(self, wake: Callable[[], None]) -> ExecutorInfo:
        """Allocate the KV cache (and load the model). `wake` may be called from any thread to
        make the engine look at its scheduler again (a disk read finished)."""
        ...

    async def stop(self) -> None:
        """Let a step in flight finish and release what start() took."""
        ...

    def new_request_state(self, request: PreprocessedRequest) -> object:
        """Check what only this executor can (token ids in its vocabulary, sampling parameters
        it supports; raise InvalidRequest naming the parameter) and build the request's
        per-request state, which its Sequence carries as `exec_state`."""
        ...

    def imported(self, seq: Sequence, token_id: int) -> None:
        """`seq`'s first token `token_id` was sampled by another engine (disaggregated prefill):
        bring its per-request state to where sampling that token here would have left it."""
        ...

    def release(self, seq: Sequence) -> None:
        """`seq` is done (finished, aborted or failed) and will not be scheduled again: free
        what its state holds beyond itself. May be called while a step that includes it runs
        (that step may still use it) and more than once."""
        ...

    async def run(self, batch: ScheduledBatch) -> StepResult:
        """Compute one step: carry out the KVBM work the scheduler planned (onboards before the
        forward pass that reads them), run the batch and sample one token per sampling row.
        The batch's requests may be aborted meanwhile; their rows are computed anyway."""
        ...

    async def wait_for_reads(self) -> None:
        """Nothing can run: every request left is held back for KVBM disk reads. Carry out
        pending KVBM work (its copies and writes need not wait for the next step); return when
        the engine should look again, or leave that to `wake`."""
        ...

    def kv_layout(self) -> KvLayoutSpec: ...

    def kv_memory(self) -> KvMemory | None:
        """The KV tensors for a transfer agent (after start); None when there are no bytes."""
        ...


class LaunchedStep(Protocol):
    async def result(self) -> StepResult:
        """Wait for the step's tokens (not for steps launched after it) and return them."""
        ...


@runtime_checkable
class OverlapExecutor(StepExecutor, Protocol):
    """An executor that can queue a step before the previous one's tokens are read (the
    overlap scheduler, as SGLang's and nano-vllm's): the engine launches step N+1, then reads
    step N's tokens and schedules step N+2 while N+1 computes. A decode row of N+1 whose
    input is N's token (position len(seq.token_ids), not known on the host yet) reads it on
    the device. `overlap` turns the loop on; the plain loop calls `run`."""

    overlap: bool

    async def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Carry out the KVBM plan, queue the step and return without waiting for its tokens."""
        ...

    def needs_previous(self, batch: ScheduledBatch) -> bool:
        """Whether the step in flight must be finished before `batch` is launched (a row whose
        sampling reads host state that the previous token changes, such as a grammar)."""
        ...
