"""planner/perf_model.py: interpolation of prefill time, the ITL plane, the largest batch
within an ITL target, and the JSON round trip profile_worker.py and the planner share."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from planner.perf_model import DecodePoint, PerfModel, PrefillPoint, load_perf_model, save_perf_model


def model(**kw: object) -> PerfModel:
    # ITL = 5 ms + 0.1 ms per stream + 1e-7 s per (stream x context token): a known plane.
    decode = [
        DecodePoint(b, c, 0.005 + 0.0001 * b + 1e-7 * b * c) for b in (1, 8, 32, 64) for c in (256, 2048)
    ]
    args = dict(
        engine="test",
        prefill=[PrefillPoint(128, 0.010), PrefillPoint(1024, 0.040), PrefillPoint(4096, 0.160)],
        decode=decode,
        max_batch=64,
        kv_capacity_tokens=100_000,
    )
    args.update(kw)
    return PerfModel(**args)  # type: ignore[arg-type]


def test_prefill_interpolates_and_extrapolates_linearly() -> None:
    m = model()
    assert m.prefill_s(1024) == pytest.approx(0.040)
    assert m.prefill_s(576) == pytest.approx(0.025)  # halfway between 128 and 1024
    assert m.prefill_s(8192) == pytest.approx(0.320)  # past the last point: its tokens per second
    assert m.prefill_s(10) == pytest.approx(0.010)  # below the first: no faster than it
    assert m.prefill_tokens_per_s(4096) == pytest.approx(4096 / 0.160)


def test_itl_plane_is_recovered_from_the_points() -> None:
    m = model()
    assert m.itl_s(16, 1000) == pytest.approx(0.005 + 0.0016 + 1e-7 * 16 * 1000, rel=1e-6)


def test_max_batch_within_target_is_bounded_by_itl_batch_limit_and_kv() -> None:
    m = model()
    # 0.005 + 0.0001 b + 1e-7 * b * 1000 <= 0.009  ->  b <= 20
    assert m.max_batch_within(0.009, 1000) == 20
    assert m.max_batch_within(1.0, 1000) == 64  # the engine's batch limit
    assert model(kv_capacity_tokens=10_000).max_batch_within(1.0, 1000) == 10  # KV capacity
    assert m.max_batch_within(0.001, 1000) == 0  # not even one stream meets it


def test_round_trip_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "perf.json"
    save_perf_model(model(notes="x"), path)
    assert load_perf_model(path) == model(notes="x")
    path.write_text('{"engine": "e", "prefill": [], "decode": [], "max_batch": 1, "kv_capacity_tokens": 1}')
    with pytest.raises((ValueError, msgspec.ValidationError)):
        load_perf_model(path)
