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
    OutputConstraint,
    PreprocessedRequest,
    PromptTokenLogprob,
    SamplingOptions,
    StopConditions,
)
from workers.sglang.args import SglangConfig, add_sglang_args
from workers.sglang.kv_events import kv_events_config, translator, user_zmq_endpoint, wire_kv_events
from workers.sglang.sampling import (
    TOP_K_ALL,
    OutputDeltas,
    abort_error,
    finish_reason,
    logprob_args,
    prompt_logprobs,
    sampling_params,
)
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


# SGLang 0.5.23's SamplingParams fields (sglang/srt/sampling/sampling_params.py) and the
# logprob keywords of Engine.async_generate: every key we send must be one of them.
SGLANG_SAMPLING_FIELDS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
})  # fmt: skip
SGLANG_LOGPROB_KWARGS = frozenset({"return_logprob", "top_logprobs_num", "logprob_start_len"})


def constrained(kind: str, spec: str = "", **kw: Any) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="r", model="m", token_ids=list(range(10)), stop=StopConditions(max_tokens=5),
                               constraint=OutputConstraint(kind=kind, spec=spec), **kw)  # type: ignore[arg-type]


def test_every_new_sampling_option_maps_onto_sglang_fields() -> None:
    s = SamplingOptions(temperature=0.5, min_p=0.1, frequency_penalty=0.4, presence_penalty=-0.3,
                        logit_bias={7: -100.0, 12: 3.5}, logprobs=True, top_logprobs=3)
    params = sampling_params(req(sampling=s, max_tokens=4), 100)
    assert params["min_p"] == 0.1
    assert (params["frequency_penalty"], params["presence_penalty"]) == (0.4, -0.3)
    assert params["logit_bias"] == {"7": -100.0, "12": 3.5}  # SGLang keys token ids as strings
    assert set(params) <= SGLANG_SAMPLING_FIELDS
    assert set(sampling_params(req(), 100)) <= SGLANG_SAMPLING_FIELDS
    assert "logit_bias" not in sampling_params(req(), 100) and "min_p" not in sampling_params(req(), 100)


def test_repetition_penalty_is_refused_because_sglang_counts_output_only() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_params(req(sampling=SamplingOptions(repetition_penalty=1.2)), 100)
    assert info.value.param == "repetition_penalty" and "SGLang" in info.value.message
    assert "repetition_penalty" not in sampling_params(req(sampling=SamplingOptions(repetition_penalty=1.0)), 100)


@pytest.mark.parametrize(
    ("kind", "spec", "want"),
    [
        ("json_schema", '{"type": "object"}', {"json_schema": '{"type": "object"}'}),
        ("json_object", "", {"json_schema": '{"type": "object"}'}),
        ("regex", "[a-z]+", {"regex": "[a-z]+"}),
        ("choice", '["a.b", "c d"]', {"regex": "(a\\.b)|(c d)"}),
        ("grammar", 'root ::= "x"', {"ebnf": 'root ::= "x"'}),
    ],
)
def test_constraints_map_onto_sglang_grammar_fields(kind: str, spec: str, want: dict[str, str]) -> None:
    params = sampling_params(constrained(kind, spec), 100, grammar=True)
    assert {k: params[k] for k in want} == want
    assert set(params) <= SGLANG_SAMPLING_FIELDS


def test_choice_regex_matches_exactly_the_choices() -> None:
    import re

    regex = sampling_params(constrained("choice", json.dumps(["1+1", "(x)", "a|b", "plain"])), 100, grammar=True)["regex"]
    assert [bool(re.fullmatch(regex, s)) for s in ("1+1", "(x)", "a|b", "plain", "11", "x", "a")] == [True] * 4 + [False] * 3


@pytest.mark.parametrize(("kind", "spec"), [("json_schema", "{nope"), ("json_schema", "[1]"), ("choice", "[1]"), ("choice", "[]")])
def test_malformed_constraints_are_invalid_requests(kind: str, spec: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_params(constrained(kind, spec), 100, grammar=True)
    assert info.value.param == "response_format"


def test_constraints_are_refused_without_sglangs_grammar_backend() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_params(constrained("regex", "[a-z]+"), 100, grammar=False)
    assert info.value.param == "response_format" and "--sglang-structured-outputs" in info.value.message
    # The flag keeps SGLang's tokenizer, which is what gives SGLang its grammar backend.
    assert parse(["--model", "/m"]).grammar_available is False
    on = parse(["--model", "/m", "--sglang-structured-outputs"])
    assert on.grammar_available is True and on.server_kwargs["skip_tokenizer_init"] is False
    assert SglangConfig.for_model("/m", structured_outputs=True).grammar_available is True
    assert SglangConfig.for_model("/m", structured_outputs=True, grammar_backend="none").grammar_available is False


def test_migrated_constrained_or_penalised_requests_are_refused() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_params(constrained("regex", "[a-z]+", generated_before=3), 100, grammar=True)
    assert info.value.param == "response_format" and "migration" in info.value.message
    moved = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 12, generated_before=3,
                                sampling=SamplingOptions(frequency_penalty=0.5), stop=StopConditions(max_tokens=10))
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_params(moved, 100)
    assert info.value.param == "frequency_penalty"
    # Other migrated requests go on.
    plain = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 12, generated_before=3,
                                sampling=SamplingOptions(logit_bias={3: 1.0}), stop=StopConditions(max_tokens=10))
    assert sampling_params(plain, 100)["max_new_tokens"] == 7


def test_logprob_arguments() -> None:
    assert logprob_args(req()) == {"return_logprob": False}
    assert logprob_args(req(sampling=SamplingOptions(logprobs=True))) == {
        "return_logprob": True, "top_logprobs_num": 0, "logprob_start_len": -1}
    with_prompt = PreprocessedRequest(request_id="r", model="m", token_ids=[1, 2], prompt_logprobs=4,
                                      sampling=SamplingOptions(logprobs=True, top_logprobs=2))
    assert logprob_args(with_prompt) == {"return_logprob": True, "top_logprobs_num": 4, "logprob_start_len": 0}
    migrated = msgspec.structs.replace(with_prompt, generated_before=1)
    assert logprob_args(migrated)["logprob_start_len"] == -1  # the first worker sent them
    for args in (logprob_args(with_prompt), logprob_args(req())):
        assert set(args) <= SGLANG_LOGPROB_KWARGS


def test_top_logprobs_and_prompt_logprobs_from_meta_info() -> None:
    d = OutputDeltas(incremental=False)
    meta = {
        "output_token_logprobs": [(-0.5, 5, None), (-1.5, 6, None)],
        "output_top_logprobs": [[(-0.5, 5, None), (-0.9, 8, None)], [(-1.1, 9, None), (-1.5, 6, None), (-2.0, 1, None)]],
    }
    out = {"output_ids": [5, 6], "meta_info": meta}
    assert d.top_logprobs(out, 1, 2) == [[(9, -1.1), (6, -1.5)]]
    assert d.top_logprobs(out, 2, 1) == [[(5, -0.5)], [(9, -1.1)]]
    assert d.top_logprobs(out, 1, 0) is None
    prompt = prompt_logprobs({"input_token_logprobs": [(None, 1, None), (-2.0, 2, None)],
                              "input_top_logprobs": [None, [(-0.1, 4, None), (-2.0, 2, None)]]}, 1)
    assert prompt == [None, PromptTokenLogprob(logprob=-2.0, top=[(4, -0.1)])]
    assert prompt_logprobs({}, 1) is None


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
