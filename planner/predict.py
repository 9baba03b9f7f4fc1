"""Load predictors: each sees one series (request rate, prompt length, output length), one
value per adjustment interval, and predicts the next interval's value."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from planner.config import PredictorKind


class Predictor(Protocol):
    def observe(self, value: float) -> None: ...

    def predict(self, steps: float = 1.0) -> float:
        """The value `steps` intervals ahead (1: the next interval); 0.0 before anything was
        observed."""
        ...


class ConstantPredictor:
    """The next interval looks like the last one."""

    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        self._last = value

    def predict(self, steps: float = 1.0) -> float:
        return self._last


class MovingAveragePredictor:
    """The mean of the last `window` intervals: steadier than constant, slower to follow a ramp."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self._values.append(value)

    def predict(self, steps: float = 1.0) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0


class HoltPredictor:
    """Holt's linear trend (double exponential smoothing): a level and a trend, each an
    exponentially weighted average, so a ramp is extrapolated ahead (by the planner's lead
    time: a worker's start-up) instead of being followed late. Never negative (a falling trend ends at zero load)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        if not (0 < alpha <= 1 and 0 < beta <= 1):
            raise ValueError("alpha and beta must be in (0, 1]")
        self._alpha, self._beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0

    def observe(self, value: float) -> None:
        if self._level is None:
            self._level = value
            return
        previous = self._level
        self._level = self._alpha * value + (1 - self._alpha) * (previous + self._trend)
        self._trend = self._beta * (self._level - previous) + (1 - self._beta) * self._trend

    def predict(self, steps: float = 1.0) -> float:
        if self._level is None:
            return 0.0
        return max(0.0, self._level + steps * self._trend)


def make_predictor(kind: PredictorKind, window: int = 5) -> Predictor:
    if kind == "constant":
        return ConstantPredictor()
    if kind == "moving-average":
        return MovingAveragePredictor(window)
    return HoltPredictor()
