"""frontend/tenants.py: the keys file (YAML or JSON), `--api-key` as the tenant `default`, and
hot reload: a new key works and a removed one gets 401 once the file is re-read."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from frontend.app import create_app
from frontend.config import FrontendConfig, add_frontend_args
from frontend.metrics import FrontendMetrics
from frontend.tenants import (
    DEFAULT_TENANT,
    Tenant,
    TenantLimits,
    TenantRegistry,
    TenantsFileError,
    parse_tenants,
    read_tenants_file,
)
from tests.unit.frontend.conftest import MODEL, Stack, start_worker

YAML = """
tenants:
  team-a:
    priority: interactive
    limits:
      requests_per_min: 600
      input_tokens_per_min: 200000
      output_tokens_per_min: 50000
    keys: [sk-a-1, sk-a-2]
  batch:
    priority: batch
    keys_sha256: [{digest}]
"""


def test_yaml_file_maps_keys_to_tenants(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(YAML.format(digest=hashlib.sha256(b"sk-batch").hexdigest()))
    table = read_tenants_file(path, default_keys=["legacy"])
    a = table.lookup(b"sk-a-1")
    assert a == Tenant("team-a", "interactive", TenantLimits(600, 200_000, 50_000))
    assert table.lookup(b"sk-a-2") is a
    assert table.lookup(b"sk-batch") == Tenant("batch", "batch", TenantLimits())
    assert table.lookup(b"legacy") == Tenant(DEFAULT_TENANT)
    assert table.lookup(b"sk-a-3") is None
    assert len(table) == 4


def test_json_file_and_default_tenant_limits(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    data = {"tenants": {"default": {"limits": {"requests_per_min": 5}}}}
    path.write_text(json.dumps(data))
    # --api-key's keys get the limits of a `default` tenant declared in the file.
    assert read_tenants_file(path, ["legacy"]).lookup(b"legacy") == Tenant(
        "default", limits=TenantLimits(requests_per_min=5)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be a mapping"),
        ({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}, "also a key of"),
        ({"tenants": {"a": {"limits": {"requests_per_hour": 1}}}}, "unknown limits"),
        ({"tenants": {"a": {"limits": {"requests_per_min": -1}}}}, ">= 0"),
        ({"tenants": {"a": {"key": ["k"]}}}, "unknown fields"),
        ({"tenants": {"a": {"keys_sha256": ["abc"]}}}, "64 hex digits"),
    ],
)
def test_bad_files_are_refused(data: object, message: str) -> None:
    with pytest.raises(TenantsFileError, match=message):
        parse_tenants(data)


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("DYN_TENANTS_FILE", "/etc/dynamo/tenants.yaml")
    parser = argparse.ArgumentParser()
    add_frontend_args(parser)
    config = FrontendConfig.from_args(parser.parse_args(["--tenants-poll-s", "0.5"]))
    assert config.tenants_file == "/etc/dynamo/tenants.yaml" and config.tenants_poll_s == 0.5


def _replace(path: Path, data: object) -> None:
    """Write the way a deploy does: a new file renamed over the old one (a new inode)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def test_reload_swaps_the_table_and_keeps_it_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    _replace(path, {"tenants": {"a": {"keys": ["k1"]}}})
    registry = TenantRegistry(path)
    assert not await registry.reload()  # unchanged
    _replace(path, {"tenants": {"a": {"keys": ["k2"]}}})
    assert await registry.reload() and registry.reloaded.is_set()
    assert registry.lookup(b"k1") is None and registry.lookup(b"k2") == Tenant("a")
    path.write_text("{not json")
    assert not await registry.reload()
    assert registry.lookup(b"k2") == Tenant("a")  # the last good table stays
    path.unlink()
    assert not await registry.reload()
    assert registry.lookup(b"k2") == Tenant("a")


async def test_poller_reloads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    _replace(path, {"tenants": {"a": {"keys": ["k1"]}}})
    async with TenantRegistry(path, poll_s=0.01) as registry:
        _replace(path, {"tenants": {"b": {"keys": ["k2"]}}})
        await registry.reloaded.wait()  # set by the poller once it has read the new file
        assert registry.lookup(b"k2") == Tenant("b")
    assert registry._task is None


def test_a_bad_file_at_startup_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: [oops]")
    with pytest.raises(TenantsFileError):
        TenantRegistry(path)
    with pytest.raises(FileNotFoundError):
        TenantRegistry(tmp_path / "missing.yaml")


@pytest.fixture
async def file_app(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TenantRegistry, Path]]:
    path = tmp_path / "tenants.json"
    _replace(path, {"tenants": {"team-a": {"keys": ["old-key"]}}})
    config = FrontendConfig(tenants_file=str(path), tenants_poll_s=3600)
    app = create_app(stack.manager, FrontendMetrics(CollectorRegistry()), config)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield client, app.state.tenants, path
    finally:
        await client.aclose()
        await app.state.tenants.aclose()


async def test_reloaded_file_through_the_app(
    stack: Stack, file_app: tuple[httpx.AsyncClient, TenantRegistry, Path]
) -> None:
    client, tenants, path = file_app
    await start_worker(stack, [10, 11])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert (await client.post("/v1/completions", json=body, headers={"authorization": "Bearer old-key"})).status_code == 200
    assert (await client.post("/v1/completions", json=body, headers={"authorization": "Bearer new-key"})).status_code == 401

    _replace(path, {"tenants": {"team-a": {"keys": ["new-key"]}}})
    assert await tenants.reload()  # what the poller does every --tenants-poll-s
    assert (await client.post("/v1/completions", json=body, headers={"authorization": "Bearer new-key"})).status_code == 200
    removed = await client.post("/v1/completions", json=body, headers={"authorization": "Bearer old-key"})
    assert removed.status_code == 401 and removed.json()["error"]["code"] == "invalid_api_key"
    # The full middleware stack (GET /v1/models) resolves keys from the same table.
    assert (await client.get("/v1/models", headers={"authorization": "Bearer new-key"})).status_code == 200
    assert (await client.get("/v1/models", headers={"authorization": "Bearer old-key"})).status_code == 401
