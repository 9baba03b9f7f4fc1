"""A worker's performance model, measured by benchmarks/profile_worker.py and saved as JSON:
prefill time as a function of prompt length, and inter-token latency as a function of the
decode batch and the KV tokens it attends over. The SLA mode turns it into replicas."""

from __future__ import annotations

import bisect
from pathlib import Path

import msgspec
import numpy as np


class PrefillPoint(msgspec.Struct, frozen=True):
    input_tokens: int
    prefill_s: float  # one prompt alone on an idle worker: its time to first token


class DecodePoint(msgspec.Struct, frozen=True):
    batch: int  # streams decoding at once
    context_tokens: int  # KV tokens each stream attends over
    itl_s: float


class PerfModel(msgspec.Struct, frozen=True):
    """What one worker of one engine (at one speedup, for the mocker) can do."""

    engine: str
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]
    max_batch: int  # the engine's most concurrent streams (--max-num-seqs)
    kv_capacity_tokens: int  # KV tokens the worker holds
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("a performance model needs prefill and decode points")
        if self.max_batch < 1 or self.kv_capacity_tokens < 1:
            raise ValueError("max_batch and kv_capacity_tokens must be positive")

    # --------------------------------------------------------------------------- prefill

    def prefill_s(self, input_tokens: float) -> float:
        """Prefill time of one prompt, interpolated between measured lengths (linearly in
        tokens: beyond the last point, at the last point's tokens per second)."""
        points = sorted(self.prefill, key=lambda p: p.input_tokens)
        xs = [p.input_tokens for p in points]
        if input_tokens <= xs[0]:
            return points[0].prefill_s * max(input_tokens, 1) / max(xs[0], 1) if len(points) == 1 else points[0].prefill_s
        if input_tokens >= xs[-1]:
            last = points[-1]
            return last.prefill_s * input_tokens / last.input_tokens
        i = bisect.bisect_left(xs, input_tokens)
        a, b = points[i - 1], points[i]
        f = (input_tokens - a.input_tokens) / (b.input_tokens - a.input_tokens)
        return a.prefill_s + f * (b.prefill_s - a.prefill_s)

    def prefill_tokens_per_s(self, input_tokens: float) -> float:
        tokens = max(input_tokens, 1.0)
        return tokens / self.prefill_s(tokens)

    # ---------------------------------------------------------------------------- decode

    def itl_s(self, batch: float, context_tokens: float) -> float:
        """ITL at `batch` streams of `context_tokens` each: a least-squares plane
        itl = a + b*batch + c*batch*context over the measured points (a step reads the weights
        once, then grows with the tokens computed and the KV read), never below the fastest
        measured step."""
        a, b, c = self._decode_fit()
        floor = min(p.itl_s for p in self.decode)
        return max(floor, a + b * batch + c * batch * context_tokens)

    def max_batch_within(self, itl_target_s: float, context_tokens: float) -> int:
        """The most streams one worker decodes at once with its ITL within the target, also
        bounded by its batch limit and its KV capacity (0 when even one stream misses it)."""
        by_kv = int(self.kv_capacity_tokens // max(context_tokens, 1.0))
        limit = max(0, min(self.max_batch, by_kv))
        lo, hi = 0, limit
        while lo < hi:  # itl_s grows with the batch: the largest batch within the target
            mid = (lo + hi + 1) // 2
            if self.itl_s(mid, context_tokens) <= itl_target_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _decode_fit(self) -> tuple[float, float, float]:
        rows = [(1.0, float(p.batch), float(p.batch * p.context_tokens)) for p in self.decode]
        ys = [p.itl_s for p in self.decode]
        return _least_squares(rows, ys)


def _least_squares(rows: list[tuple[float, float, float]], ys: list[float]) -> tuple[float, float, float]:
    """Minimum-norm least squares (numpy's lstsq copes with degenerate columns, e.g. one
    batch size measured)."""
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def load_perf_model(path: str | Path) -> PerfModel:
    return msgspec.json.decode(Path(path).read_bytes(), type=PerfModel)


def save_perf_model(model: PerfModel, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(model), indent=2) + b"\n")
