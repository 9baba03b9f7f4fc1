"""Shared pytest setup: real nats-server/etcd fixtures live in tests/infra.py, the tracing
tests' spans file in tests/spans.py.

Hypothesis: no per-example deadline and no "too slow" health check anywhere. Both measure wall
time, so a property test would fail when CI runs on a loaded machine although every example
passed; the properties themselves are what the tests assert."""

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.infra", "tests.spans"]

settings.register_profile("dynamo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dynamo")
