"""The SGLang worker's parts that need no SGLang: flag pass-through, sampling-params mapping,
output deltas and finish reasons, KV events (SGLang 0.5.23's wire format, over a real ZMQ socket)
re-hashed to our block hash, load metrics. None of this may import sglang."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo import errors
from dynamo.kv_hash import block_hashes
from dynamo.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventData,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from workers.sglang.args import SglangConfig, add_sglang_args
from workers.sglang.kv_events import kv_events_config, translator, user_zmq_endpoint, wire_kv_events
from workers.sglang.sampling import TOP_K_ALL, OutputDeltas, abort_error, finish_reason, sampling_params
from workers.sglang.stats import load_from_snapshots
from workers.vllm.kv_events import BATCH_DECODER

REPO = Path(__file__).resolve().parents[4]


def test_importing_the_adapter_does_not_import_sglang() -> None:
    # In a fresh interpreter: other tests in this process may have tried (and failed) to
    # import sglang themselves, e.g. to build the worker's parser.
    code = "import sys, workers.sglang.engine, workers.registry; sys.exit('sglang' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------- flags


def sglang_like_parser() -> argparse.ArgumentParser:
    """Flags spelled and typed as SGLang 0.5.23's ServerArgs.add_cli_args spells them."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model-path", "--model", dest="model_path", type=str)
    p.add_argument("--served-model-name", type=str, default=None)
    p.add_argument("--log-level", type=str, default="info")
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--disaggregation-mode", choices=["null", "prefill", "decode"], default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    p.add_argument("--disaggregation-transfer-backend", type=str, default="mooncake")
    p.add_argument("--kv-events-config", type=str, default=None)
    p.add_argument("--enable-metrics", action="store_true")
    return p


def parse(argv: list[str]) -> SglangConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name")
    parser.add_argument("--log-level", default="INFO")
    add_sglang_args(parser, sglang_like_parser())
    return SglangConfig.from_args(parser.parse_args(argv))


def test_sglang_flags_pass_through_unchanged() -> None:
    cfg = parse([
        "--model", "/m", "--served-model-name", "tiny", "--page-size", "16",
        "--mem-fraction-static", "0.7", "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", "9001", "--disaggregation-transfer-backend", "nixl",
        "--enable-metrics", "--log-level", "DEBUG", "--no-publish-kv-events",
    ])
    assert cfg.server_kwargs == {
        "model_path": "/m",
        "served_model_name": "tiny",
        "page_size": 16,
        "mem_fraction_static": 0.7,
        "disaggregation_mode": "prefill",
        "disaggregation_bootstrap_port": 9001,
        "disaggregation_transfer_backend": "nixl",
        "kv_events_config": None,
        "enable_metrics": True,
        "skip_tokenizer_init": True,  # the worker exchanges token ids
    }
    # Ours never reach ServerArgs; the entry point's --log-level is not SGLang's.
    assert cfg.publish_kv_events is False


def test_sglang_defaults_are_its_own() -> None:
    cfg = parse(["--model", "/m"])
    assert cfg.server_kwargs["disaggregation_mode"] == "null"
    assert cfg.server_kwargs["disaggregation_bootstrap_port"] == 8998
    assert "served_model_name" not in cfg.server_kwargs
    assert cfg.publish_kv_events is True


def test_bad_choice_is_rejected_by_sglangs_own_action() -> None:
    with pytest.raises(SystemExit):
        parse(["--model", "/m", "--disaggregation-mode", "both"])


# ---------------------------------------------------------------------------- sampling


def req(prompt_len: int = 10, sampling: SamplingOptions | None = None, **stop: Any) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r", model="m", token_ids=list(range(prompt_len)),
        sampling=sampling or SamplingOptions(), stop=StopConditions(**stop),
    )


def test_greedy_request_maps_to_sglang_params() -> None:
    params = sampling_params(req(max_tokens=5, stop_token_ids=[3, 9]), 100, eos_token_ids=(3,))
    assert params == {
        "temperature": 0.0, "top_p": 1.0, "top_k": TOP_K_ALL, "max_new_tokens": 5,
        "min_new_tokens": 0, "ignore_eos": False, "skip_special_tokens": False,
        "no_stop_trim": True, "stop_token_ids": [3, 9],
    }


def test_sampled_request_maps_every_option() -> None:
    s = SamplingOptions(temperature=0.7, top_p=0.9, top_k=40, seed=11)
    params = sampling_params(req(sampling=s, max_tokens=8, min_tokens=2, ignore_eos=True,
                                 stop_token_ids=[3, 9]), 100, eos_token_ids=(3,))
    assert params["temperature"] == 0.7 and params["top_p"] == 0.9 and params["top_k"] == 40
    assert params["sampling_seed"] == 11 and params["min_new_tokens"] == 2
    assert params["ignore_eos"] is True and params["stop_token_ids"] == [9]  # EOS dropped


def test_max_tokens_default_is_the_rest_of_the_context_and_migration_counts() -> None:
    assert sampling_params(req(prompt_len=30), 100)["max_new_tokens"] == 70
    migrated = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 12,
                                   stop=StopConditions(max_tokens=10, min_tokens=4), generated_before=3)
    params = sampling_params(migrated, 100)
    assert params["max_new_tokens"] == 7 and params["min_new_tokens"] == 1
    with pytest.raises(errors.InvalidRequest):
        sampling_params(req(prompt_len=100), 100)


@pytest.mark.parametrize(
    ("meta", "want"),
    [
        ({"finish_reason": None}, None),
        ({}, None),
        ({"finish_reason": {"type": "stop", "matched": 3}}, "stop"),
        ({"finish_reason": {"type": "stop", "matched": "###"}}, "stop"),
        ({"finish_reason": {"type": "length", "length": 16}}, "length"),
        ({"finish_reason": {"type": "abort", "message": "Aborted", "status_code": None}}, "cancelled"),
        ({"finish_reason": {"type": "abort", "message": "too long", "status_code": 400}}, "error"),
    ],
)
def test_finish_reasons(meta: dict[str, Any], want: str | None) -> None:
    assert finish_reason(meta) == want


def test_abort_errors_keep_their_meaning() -> None:
    def err(code: int) -> errors.DynamoError:
        return abort_error({"finish_reason": {"type": "abort", "message": "m", "status_code": code}})

    assert isinstance(err(400), errors.InvalidRequest)
    assert isinstance(err(503), errors.Overloaded)
    assert isinstance(err(500), errors.EngineError)


def test_cumulative_stream_becomes_deltas() -> None:
    d = OutputDeltas(incremental=False)
    shared: list[int] = []  # SGLang hands the same growing list on intermediate chunks
    got = []
    for tok in (5, 6, 7):
        shared.append(tok)
        got.append(d.take({"output_ids": shared}))
    assert got == [[5], [6], [7]]
    assert d.take({"output_ids": [5, 6, 7, 8, 9]}) == [8, 9]  # two steps coalesced


def test_incremental_stream_is_taken_as_is() -> None:
    d = OutputDeltas(incremental=True)
    assert [d.take({"output_ids": [5]}), d.take({"output_ids": [6, 7]})] == [[5], [6, 7]]


def test_logprobs_are_the_last_entries() -> None:
    d = OutputDeltas(incremental=False)
    out = {"output_ids": [5, 6], "meta_info": {"output_token_logprobs": [(-0.5, 5, None), (-1.5, 6, None)]}}
    assert d.logprobs(out, 1) == [-1.5]
    assert d.logprobs({"output_ids": [], "meta_info": {}}, 0) is None


# --------------------------------------------------------------------------- KV events


class SgBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    """SGLang 0.5.23's BlockStored field for field (sglang/srt/disaggregation/kv_events.py)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class SgBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[int]
    medium: str | None = None


class SgAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    pass


class SgBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[SgBlockStored | SgBlockRemoved | SgAllBlocksCleared]
    attn_dp_rank: int | None = None


PAGE = 4


def sglang_store_events(tokens: list[int], medium: str = "GPU", salt: str | None = None) -> list[SgBlockStored]:
    """One event per page, chained by parent, as SGLang's radix cache records a node."""
    out, parent = [], None
    for i in range(0, len(tokens) // PAGE * PAGE, PAGE):
        h = hash((salt, tuple(tokens[: i + PAGE]))) & 0x7FFF_FFFF_FFFF_FFFF
        out.append(SgBlockStored([h], parent, tokens[i : i + PAGE], PAGE, None, medium, salt, "s1"))
        parent = h
    return out


def test_sglang_events_are_rehashed_to_our_block_hash() -> None:
    seen: list[KvEventData] = []
    trans = translator(seen.append, PAGE)
    tokens = list(range(100, 112))
    for ev in sglang_store_events(tokens):
        for decoded in BATCH_DECODER.decode(msgspec.msgpack.encode(SgBatch(1.0, [ev]))).events:
            trans.apply(decoded)
    stored = [h for e in seen if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored == block_hashes(tokens, PAGE)


async def test_sglang_wire_format_over_zmq_reaches_the_sink() -> None:
    # pyzmq comes with the engines (vLLM, SGLang), not with the project: scripts/test.sh runs
    # this module again in the vLLM venv, where it is installed.
    zmq = pytest.importorskip("zmq")
    import zmq.asyncio

    seen: list[KvEventData] = []
    kwargs, trans, sub = wire_kv_events({"model_path": "/m", "page_size": PAGE}, seen.append, PAGE)
    endpoint = json.loads(kwargs["kv_events_config"])["endpoint"]
    assert json.loads(kwargs["kv_events_config"])["bind"] is False  # SGLang connects to us
    sub.start()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(endpoint)
    try:
        tokens = list(range(7, 19))
        salted = sglang_store_events(tokens, medium="CPU_PINNED", salt="x")
        plain = sglang_store_events(tokens)
        batches = [SgBatch(time.time(), plain), SgBatch(time.time(), salted),
                   SgBatch(time.time(), [SgBlockRemoved([plain[-1].block_hashes[0]])]),
                   SgBatch(time.time(), [SgAllBlocksCleared()])]
        deadline = time.monotonic() + 10
        # A fresh PUB drops what it sends before the subscription arrives: send clears (which
        # reset everything) until one lands, then the batches under test, in sequence.
        seq = 0
        while not seen and time.monotonic() < deadline:
            await pub.send_multipart([b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode(SgBatch(0.0, [SgAllBlocksCleared()]))])
            seq += 1
            await asyncio.sleep(0.05)
        seen.clear()
        for batch in batches:
            await pub.send_multipart([b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode(batch)])
            seq += 1
        while not any(isinstance(e, AllBlocksCleared) for e in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        pub.close(linger=0)
        ctx.term()
        await sub.stop()
    ours = block_hashes(tokens, PAGE)
    device = [h for e in seen if isinstance(e, BlockStored) and e.tier == "device" for h in e.block_hashes]
    host = [h for e in seen if isinstance(e, BlockStored) and e.tier == "host" for h in e.block_hashes]
    assert set(device) == set(ours) and host == ours  # salted copies: same tokens, same hashes
    removed = [e for e in seen if isinstance(e, BlockRemoved)]
    assert removed == [BlockRemoved(block_hashes=[ours[-1]], tier="device")]
    assert isinstance(seen[-1], AllBlocksCleared)


def test_user_zmq_config_is_kept_and_followed() -> None:
    cfg = json.dumps({"publisher": "zmq", "endpoint": "tcp://*:5600", "topic": "kv"})
    assert user_zmq_endpoint(cfg) == ("tcp://*:5600", "kv")
    assert user_zmq_endpoint(json.dumps({"publisher": "null"})) is None
    assert user_zmq_endpoint(None) is None
    assert json.loads(kv_events_config("tcp://127.0.0.1:1"))["publisher"] == "zmq"


# ------------------------------------------------------------------------------- load


def test_load_snapshots_sum_over_ranks_in_pages() -> None:
    snaps = [
        SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, num_waiting_uncached_tokens=40,
                        num_used_tokens=33, max_total_num_tokens=1024),
        SimpleNamespace(num_running_reqs=2, num_waiting_reqs=0, num_waiting_uncached_tokens=0,
                        num_used_tokens=16, max_total_num_tokens=1024),
    ]
    load = load_from_snapshots(snaps, 16)
    assert (load.active_requests, load.waiting_requests, load.waiting_prefill_tokens) == (5, 1, 40)
    assert load.kv_active_blocks == 4 and load.kv_total_blocks == 128  # 49 tokens -> 4 pages
