"""The `spans_file` fixture for tests of tracing (dynamo/tracing.py): tracing on for one test,
its spans exported to a JSON-lines file the test reads back (dynamo/trace_view.read_spans)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def spans_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The file the spans go to, as service "test-svc", exported within 10 ms of ending;
    `tracing.shutdown()` flushes it (the fixture calls it again at the end)."""
    from dynamo import tracing  # imported by the tests that use it only

    path = tmp_path / "spans.jsonl"
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    assert tracing.setup(tracing.TracingConfig(trace_file=str(path), service_name="test-svc"))
    try:
        yield path
    finally:
        tracing.shutdown()
