"""frontend/rate_limit.py: token-bucket arithmetic on a fake clock, and the limits through the
app (429 with Retry-After and x-ratelimit-* for one tenant while another is served; output
tokens charged with what the stream produced)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from frontend.app import create_app
from frontend.config import FrontendConfig
from frontend.metrics import FrontendMetrics
from frontend.rate_limit import RateLimited, RateLimiter, TokenBucket, format_duration
from frontend.tenants import Tenant, TenantLimits
from tests.unit.frontend.conftest import MODEL, Stack, start_worker


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


# ------------------------------------------------------------------------- bucket arithmetic


def test_bucket_refills_at_capacity_per_minute_and_caps() -> None:
    bucket = TokenBucket(60, now_s=0.0)  # 1 per second
    bucket.charge(60)
    assert bucket.level == 0
    bucket.refill(10.0)
    assert bucket.level == pytest.approx(10)
    assert bucket.wait_s(15) == pytest.approx(5)
    bucket.refill(1000.0)
    assert bucket.level == 60  # never above capacity
    assert bucket.wait_s(500) == 0  # asking more than the capacity waits for a full bucket only


def test_bucket_debt_is_paid_back_before_admitting() -> None:
    bucket = TokenBucket(120, now_s=0.0)  # 2 per second
    bucket.charge(200)  # usage known afterwards may overdraw
    assert bucket.level == -80
    assert bucket.wait_s(1) == pytest.approx(40.5)
    bucket.refill(40.0)
    assert bucket.level == pytest.approx(0)
    assert bucket.full_in_s() == pytest.approx(60)


def test_bucket_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(60, now_s=10.0)
    bucket.charge(30)
    bucket.refill(5.0)
    assert bucket.level == 30
    bucket.refill(11.0)
    assert bucket.level == pytest.approx(31)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.25, "250ms"), (0.0001, "1ms"), (6.0, "6s"), (6.5, "6.5s"), (90.0, "1m30s"), (120.5, "2m0.5s")],
)
def test_format_duration_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _quota(clock: FakeClock, **limits: int) -> tuple[RateLimiter, Tenant]:
    limiter = RateLimiter(FrontendMetrics(CollectorRegistry()), clock)
    return limiter, Tenant("a", limits=TenantLimits(**limits))


def test_requests_per_min_admits_then_limits_then_refills() -> None:
    clock = FakeClock()
    limiter, tenant = _quota(clock, requests_per_min=3)
    quota = limiter.quota(tenant)
    for _ in range(3):
        quota.admit(0).finish(failed=False)
    with pytest.raises(RateLimited) as info:
        quota.admit(0)
    headers = dict(info.value.headers)
    assert headers[b"retry-after"] == b"20"  # one request per 20 s
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert b"x-ratelimit-limit-tokens" not in headers  # no token limits
    clock.now_s += 20
    quota.admit(0)  # refilled one


def test_refusal_takes_nothing() -> None:
    clock = FakeClock()
    limiter, tenant = _quota(clock, requests_per_min=10, input_tokens_per_min=100)
    quota = limiter.quota(tenant)
    quota.admit(40 * 4)
    assert quota.input_tokens is not None and quota.input_tokens.level == 60
    with pytest.raises(RateLimited) as info:
        quota.admit(400 * 4)  # more than the whole bucket: waits for a full one (40 tokens, 24 s)
    assert dict(info.value.headers)[b"retry-after"] == b"24"
    assert quota.requests is not None and quota.requests.level == 9
    assert quota.input_tokens.level == 60
    clock.now_s += 24
    quota.admit(400 * 4)  # a full bucket admits it, into debt
    assert quota.input_tokens.level == pytest.approx(-300)


def test_input_estimate_corrected_and_output_charged_at_finish() -> None:
    clock = FakeClock()
    limiter, tenant = _quota(clock, input_tokens_per_min=1000, output_tokens_per_min=100)
    quota = limiter.quota(tenant)
    admission = quota.admit(400)  # estimate: 100 tokens
    assert quota.input_tokens is not None and quota.input_tokens.level == 900
    produced = 0
    admission.opened(30, lambda: produced)
    assert quota.input_tokens.level == 970  # corrected to the real prompt
    produced = 120
    assert admission.finish(failed=False) == 120
    assert quota.output_tokens is not None and quota.output_tokens.level == -20
    with pytest.raises(RateLimited) as info:
        quota.admit(4)  # the output bucket is in debt
    headers = dict(info.value.headers)
    # 21 tokens missing at 100/60 per second: 12.6 s.
    assert headers[b"retry-after"] == b"13"
    assert headers[b"x-ratelimit-limit-tokens"] == b"100"  # the tighter bucket: output
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1m12s"
    admission.finish(failed=False)  # once only
    assert quota.output_tokens.level == -20


def test_failed_before_opening_refunds_the_estimate() -> None:
    clock = FakeClock()
    limiter, tenant = _quota(clock, requests_per_min=5, input_tokens_per_min=1000)
    quota = limiter.quota(tenant)
    quota.admit(400).finish(failed=True)
    assert quota.input_tokens is not None and quota.input_tokens.level == 1000
    assert quota.requests is not None and quota.requests.level == 4  # the request still counts
    quota.admit(400).finish(failed=False)  # no generation but served (embeddings): estimate stays
    assert quota.input_tokens.level == 900


def test_changed_limits_keep_usage() -> None:
    clock = FakeClock()
    limiter, tenant = _quota(clock, requests_per_min=10)
    quota = limiter.quota(tenant)
    for _ in range(4):
        quota.admit(0)
    tighter = Tenant("a", limits=TenantLimits(requests_per_min=5, output_tokens_per_min=50))
    assert limiter.quota(tighter) is quota
    assert quota.requests is not None and quota.requests.capacity == 5 and quota.requests.level == 5
    assert quota.output_tokens is not None and quota.output_tokens.level == 50
    limiter.quota(Tenant("a"))  # limits removed: unlimited
    assert quota.requests is None and quota.output_tokens is None
    for _ in range(100):
        quota.admit(0)


# ------------------------------------------------------------------------------ through the app


@dataclass
class TenantApp:
    client: httpx.AsyncClient
    registry: CollectorRegistry
    clock: FakeClock


TENANTS = {
    "tenants": {
        "team-a": {"limits": {"requests_per_min": 2, "output_tokens_per_min": 1000}, "keys": ["key-a"]},
        "team-b": {"limits": {"requests_per_min": 100, "output_tokens_per_min": 5}, "keys": ["key-b"]},
    }
}


@pytest.fixture
async def tenant_app(stack: Stack, tmp_path: Path) -> AsyncIterator[TenantApp]:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(TENANTS))
    registry = CollectorRegistry()
    clock = FakeClock()
    config = FrontendConfig(max_request_body_bytes=1 << 20, tenants_file=str(path), api_keys=("legacy",))
    app = create_app(stack.manager, FrontendMetrics(registry), config, clock=clock)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield TenantApp(client, registry, clock)
    finally:
        await client.aclose()
        await app.state.tenants.aclose()


def _chat(stream: bool = False, max_tokens: int = 3) -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_tenant_over_its_request_limit_gets_429_while_another_is_served(
    stack: Stack, tenant_app: TenantApp
) -> None:
    await start_worker(stack, [10, 11, 12])
    client = tenant_app.client
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-a"))).status_code == 200
    limited = await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-a"))
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "30"  # 2 per minute: one every 30 s
    assert limited.headers["x-ratelimit-limit-requests"] == "2"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert limited.headers["x-ratelimit-limit-tokens"] == "1000"
    assert limited.headers["x-ratelimit-remaining-tokens"] == "994"  # 2 x 3 output tokens
    assert limited.headers["x-ratelimit-reset-tokens"] == "360ms"
    error = limited.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "team-a" in error["message"]

    served = await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-b"))
    assert served.status_code == 200
    # --api-key's keys are the unlimited tenant `default`.
    for _ in range(5):
        assert (await client.post("/v1/chat/completions", json=_chat(), headers=_auth("legacy"))).status_code == 200

    # Anthropic's error shape on /v1/messages, with the same headers.
    messages = await client.post(
        "/v1/messages",
        json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": "key-a"},
    )
    assert messages.status_code == 429
    assert messages.json()["type"] == "error" and messages.json()["error"]["type"] == "rate_limit_error"
    assert messages.headers["x-ratelimit-remaining-requests"] == "0"

    tenant_app.clock.now_s += 30  # one request refilled, no sleeping
    assert (await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-a"))).status_code == 200

    registry = tenant_app.registry
    total = "dynamo_frontend_tenant_requests_total"
    assert _counter(registry, total, tenant="team-a", outcome="admitted") == 3
    assert _counter(registry, total, tenant="team-a", outcome="limited") == 2
    assert _counter(registry, total, tenant="team-b", outcome="admitted") == 1
    assert _counter(registry, total, tenant="default", outcome="admitted") == 5
    assert _counter(registry, "dynamo_frontend_rejected_requests_total", reason="rate_limited") == 2
    metrics = await client.get("/metrics")
    assert 'dynamo_frontend_tenant_requests_total{outcome="limited",tenant="team-a"} 2.0' in metrics.text


async def test_output_tokens_are_charged_when_the_stream_finishes(stack: Stack, tenant_app: TenantApp) -> None:
    await start_worker(stack, [10, 11, 12, 13, 14, 15])
    client = tenant_app.client
    # team-b may produce 5 output tokens a minute; admission cannot know a stream's length.
    resp = await client.post("/v1/chat/completions", json=_chat(stream=True, max_tokens=6), headers=_auth("key-b"))
    assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
    usage = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 6
    registry = tenant_app.registry
    assert _counter(registry, "dynamo_frontend_tenant_tokens_total", tenant="team-b", direction="output") == 6
    assert _counter(registry, "dynamo_frontend_tenant_tokens_total", tenant="team-b", direction="input") == (
        usage["prompt_tokens"]  # the body-size estimate was corrected to the real prompt
    )

    limited = await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-b"))
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-remaining-tokens"] == "0"
    assert limited.headers["retry-after"] == "24"  # 2 tokens missing at 5 per minute
    tenant_app.clock.now_s += 24
    assert (await client.post("/v1/chat/completions", json=_chat(), headers=_auth("key-b"))).status_code == 200


async def test_unknown_key_is_401_and_no_tenant_is_charged(stack: Stack, tenant_app: TenantApp) -> None:
    resp = await tenant_app.client.post("/v1/chat/completions", json=_chat(), headers=_auth("nope"))
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert (await tenant_app.client.post("/v1/chat/completions", json=_chat())).status_code == 401
    # Open routes stay open.
    assert (await tenant_app.client.get("/health")).status_code == 200


async def test_a_request_failing_before_any_work_gets_its_input_estimate_back(
    stack: Stack, tenant_app: TenantApp
) -> None:
    resp = await tenant_app.client.post(
        "/v1/chat/completions", json=_chat() | {"model": "no-such-model"}, headers=_auth("key-a")
    )
    assert resp.status_code == 404
    registry = tenant_app.registry
    assert _counter(registry, "dynamo_frontend_tenant_requests_total", tenant="team-a", outcome="admitted") == 1
    assert _counter(registry, "dynamo_frontend_tenant_tokens_total", tenant="team-a", direction="input") == 0
    assert _counter(registry, "dynamo_frontend_tenant_tokens_total", tenant="team-a", direction="output") == 0
