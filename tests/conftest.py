"""Shared pytest setup: real nats-server/etcd fixtures live in tests/infra.py."""

pytest_plugins = ["tests.infra"]
