"""planner/predict.py: constant, moving average and Holt's linear trend on known series."""

from __future__ import annotations

import pytest

from planner.predict import ConstantPredictor, HoltPredictor, MovingAveragePredictor, make_predictor


def feed(predictor, values):  # type: ignore[no-untyped-def]
    for v in values:
        predictor.observe(v)
    return predictor.predict()


def test_nothing_observed_predicts_zero() -> None:
    for kind in ("constant", "moving-average", "holt"):
        assert make_predictor(kind).predict() == 0.0  # type: ignore[arg-type]


def test_constant_is_the_last_value() -> None:
    assert feed(ConstantPredictor(), [1, 5, 3]) == 3


def test_moving_average_over_its_window() -> None:
    assert feed(MovingAveragePredictor(3), [100, 1, 2, 3]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        MovingAveragePredictor(0)


def test_holt_extrapolates_a_ramp() -> None:
    ramp = [2.0 * i for i in range(1, 21)]
    predicted = feed(HoltPredictor(), ramp)
    # Ahead of the last value (the trend carries it), close to the next one (42).
    assert ramp[-1] < predicted <= 44.0
    assert predicted == pytest.approx(42.0, abs=2.0)


def test_holt_follows_a_step_and_never_goes_negative() -> None:
    p = HoltPredictor()
    assert feed(p, [10.0] * 10) == pytest.approx(10.0)
    assert feed(p, [0.0] * 3) == 0.0  # a falling trend stops at zero load
    assert feed(p, [0.0] * 20) == pytest.approx(0.0, abs=1e-3)


def test_moving_average_lags_a_ramp_that_holt_follows() -> None:
    ramp = [float(i) for i in range(30)]
    assert feed(MovingAveragePredictor(5), ramp) < 29 < feed(HoltPredictor(), ramp)


def test_holt_looks_further_ahead_by_the_lead_time() -> None:
    p = HoltPredictor()
    feed(p, [float(i) for i in range(20)])
    assert p.predict(5.0) == pytest.approx(p.predict(1.0) + 4.0, abs=0.5)
    assert ConstantPredictor().predict(10.0) == 0.0
