"""The TensorRT-LLM worker's parts that need no TensorRT-LLM: flags and the options file passed
to LLM(...) unchanged, KV events switched on, sampling mapping, finish reasons, KV event dicts
(as its KVCacheEventSerializer writes them) re-hashed to our block hash, iteration stats as load.
None of this may import tensorrt_llm."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    SamplingOptions,
    StopConditions,
)
from workers.trtllm.args import DEFAULT_EVENT_BUFFER, TrtllmConfig, add_trtllm_args, with_kv_events
from workers.trtllm.kv_events import TrtllmKvEvents
from workers.trtllm.sampling import LogitBias, finish_reason, sampled_logprobs, sampling_kwargs, top_logprobs
from workers.trtllm.stats import load_from_stats

REPO = Path(__file__).resolve().parents[4]


def test_importing_the_adapter_does_not_import_tensorrt_llm() -> None:
    # In a fresh interpreter: other tests in this process may have tried (and failed) to
    # import tensorrt_llm themselves, e.g. to build the worker's parser.
    code = "import sys, workers.trtllm.engine, workers.registry; sys.exit('tensorrt_llm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------- flags


def parse(argv: list[str]) -> TrtllmConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/models/llama")
    add_trtllm_args(parser)
    return TrtllmConfig.from_args(parser.parse_args(argv))


def test_no_flags_pass_nothing() -> None:
    assert parse([]) == TrtllmConfig(model="/models/llama")


def test_trtllm_serve_spellings_map_to_llm_kwargs() -> None:
    cfg = parse(["--tp_size", "2", "--pp-size", "1", "--max_batch_size", "64", "--max-num-tokens", "8192",
                 "--max_seq_len", "4096", "--backend", "pytorch", "--trust_remote_code",
                 "--kv_cache_free_gpu_memory_fraction", "0.8"])
    assert cfg.llm_kwargs == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "max_batch_size": 64,
        "max_num_tokens": 8192, "max_seq_len": 4096, "backend": "pytorch", "trust_remote_code": True,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.8},
    }


def test_parallel_sizes_also_take_the_llm_api_names() -> None:
    cfg = parse(["--tensor-parallel-size", "16", "--pipeline-parallel-size", "2", "--moe-expert-parallel-size", "4"])
    assert cfg.llm_kwargs == {"tensor_parallel_size": 16, "pipeline_parallel_size": 2, "moe_expert_parallel_size": 4}


def test_options_file_is_merged_over_the_flags_unchanged(tmp_path: Path) -> None:
    opts = tmp_path / "extra.yaml"
    opts.write_text(
        "kv_cache_config:\n  enable_block_reuse: true\n  tokens_per_block: 64\n"
        "cuda_graph_config:\n  batch_sizes: [1, 2, 4]\nmax_batch_size: 16\n"
        "disable_overlap_scheduler: true\n"
    )
    cfg = parse(["--max_batch_size", "64", "--kv-cache-free-gpu-memory-fraction", "0.5",
                 "--extra_llm_api_options", str(opts)])
    assert cfg.llm_kwargs == {
        "max_batch_size": 16,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5, "enable_block_reuse": True, "tokens_per_block": 64},
        "cuda_graph_config": {"batch_sizes": [1, 2, 4]},
        "disable_overlap_scheduler": True,
    }


def test_options_file_must_be_a_mapping(tmp_path: Path) -> None:
    opts = tmp_path / "bad.yaml"
    opts.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit):
        parse(["--extra-engine-args", str(opts)])


def test_kv_events_are_switched_on_without_overriding_the_user() -> None:
    assert with_kv_events({})["kv_cache_config"] == {"enable_block_reuse": True, "event_buffer_max_size": DEFAULT_EVENT_BUFFER}
    user = {"kv_cache_config": {"event_buffer_max_size": 99, "enable_block_reuse": False}, "x": 1}
    assert with_kv_events(user) == {"kv_cache_config": {"event_buffer_max_size": 99, "enable_block_reuse": False}, "x": 1}
    assert user["kv_cache_config"] == {"event_buffer_max_size": 99, "enable_block_reuse": False}  # not mutated


# ---------------------------------------------------------------------------- sampling


def req(prompt_len: int = 10, sampling: SamplingOptions | None = None, **stop: Any) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="r", model="m", token_ids=list(range(prompt_len)),
                               sampling=sampling or SamplingOptions(), stop=StopConditions(**stop))


def test_greedy_is_top_k_one_with_eos_as_end_id() -> None:
    assert sampling_kwargs(req(max_tokens=5), 100, eos_token_ids=(2,)) == {
        "max_tokens": 5, "ignore_eos": False, "detokenize": False, "top_k": 1, "end_id": 2, "pad_id": 2,
    }


def test_sampled_request_maps_every_option() -> None:
    s = SamplingOptions(temperature=0.8, top_p=0.95, top_k=20, seed=5, logprobs=True)
    kw = sampling_kwargs(req(sampling=s, max_tokens=9, min_tokens=3, ignore_eos=True, stop_token_ids=[2, 7]),
                         100, eos_token_ids=(2,))
    assert kw == {"max_tokens": 9, "min_tokens": 3, "ignore_eos": True, "stop_token_ids": [7], "seed": 5,
                  "detokenize": False, "logprobs": 0, "temperature": 0.8, "top_p": 0.95, "top_k": 20,
                  "end_id": 2, "pad_id": 2}
    assert set(kw) <= TRTLLM_SAMPLING_FIELDS


def test_budget_and_migration() -> None:
    assert sampling_kwargs(req(prompt_len=40), 100)["max_tokens"] == 60
    moved = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 5,
                                stop=StopConditions(max_tokens=4), generated_before=4)
    with pytest.raises(errors.InvalidRequest):
        sampling_kwargs(moved, 100)


# TensorRT-LLM 1.2's SamplingParams and GuidedDecodingParams fields (tensorrt_llm/sampling_params.py):
# every keyword we pass must be one of them.
TRTLLM_SAMPLING_FIELDS = frozenset({
    "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids", "include_stop_str_in_output",
    "embedding_bias", "logits_processor", "apply_batched_logits_processor", "n", "best_of", "use_beam_search",
    "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed", "temperature", "min_tokens",
    "beam_search_diversity_rate", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "prompt_ignore_length", "length_penalty", "early_stopping", "no_repeat_ngram_size", "min_p",
    "beam_width_array", "logprobs", "prompt_logprobs", "return_context_logits", "return_generation_logits",
    "exclude_input_from_output", "return_encoder_output", "return_perf_metrics", "additional_model_outputs",
    "lookahead_config", "guided_decoding", "ignore_eos", "detokenize", "add_special_tokens",
    "truncate_prompt_tokens", "skip_special_tokens", "spaces_between_special_tokens",
})  # fmt: skip
TRTLLM_GUIDED_FIELDS = frozenset({"json", "regex", "grammar", "json_object", "structural_tag"})


def constrained(kind: str, spec: str = "", **kw: Any) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="r", model="m", token_ids=list(range(10)), stop=StopConditions(max_tokens=5),
                               constraint=OutputConstraint(kind=kind, spec=spec), **kw)  # type: ignore[arg-type]


def test_every_new_sampling_option_maps_onto_trtllm_fields() -> None:
    s = SamplingOptions(temperature=0.5, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.4,
                        presence_penalty=-0.3, logit_bias={7: -100.0}, logprobs=True, top_logprobs=3)
    kw = sampling_kwargs(req(prompt_len=12, sampling=s, max_tokens=4), 100)
    assert (kw["min_p"], kw["repetition_penalty"], kw["frequency_penalty"], kw["presence_penalty"]) == (0.1, 1.2, 0.4, -0.3)
    assert kw["prompt_ignore_length"] == 12  # output tokens only, as OpenAI counts them
    assert kw["logprobs"] == 3 and kw["logits_processor"] == LogitBias({7: -100.0})
    assert set(kw) <= TRTLLM_SAMPLING_FIELDS


def test_migrated_penalties_count_the_earlier_workers_tokens() -> None:
    moved = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 15, generated_before=5,
                                sampling=SamplingOptions(presence_penalty=0.5), stop=StopConditions(max_tokens=10))
    assert sampling_kwargs(moved, 100)["prompt_ignore_length"] == 10  # the last 5 prompt tokens are output


def test_logit_bias_processor_adds_in_place() -> None:
    torch = pytest.importorskip("torch")
    logits = torch.zeros(1, 1, 10)
    LogitBias({2: 5.0, 7: -100.0})(0, logits, [[1, 2]], None, None)
    assert logits[0, 0, 2] == 5.0 and logits[0, 0, 7] == -100.0 and logits.sum() == -95.0


@pytest.mark.parametrize(
    ("kind", "spec", "want"),
    [
        ("json_schema", '{"type": "object"}', {"json": '{"type": "object"}'}),
        ("json_object", "", {"json_object": True}),
        ("regex", "[a-z]+", {"regex": "[a-z]+"}),
        ("choice", '["a.b", "c"]', {"regex": "(a\\.b)|(c)"}),
        ("grammar", 'root ::= "x"', {"grammar": 'root ::= "x"'}),
    ],
)
def test_constraints_map_onto_guided_decoding(kind: str, spec: str, want: dict[str, Any]) -> None:
    kw = sampling_kwargs(constrained(kind, spec), 100, guided_decoding_backend="xgrammar")
    assert kw["guided_decoding"] == want and set(want) <= TRTLLM_GUIDED_FIELDS


def test_what_trtllm_cannot_do_is_refused_naming_the_parameter() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_kwargs(constrained("regex", "[a-z]+"), 100)  # no guided decoding backend
    assert info.value.param == "response_format" and "guided_decoding_backend" in info.value.message
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_kwargs(constrained("regex", "[a-z]+", generated_before=2), 100, guided_decoding_backend="xgrammar")
    assert info.value.param == "response_format" and "migration" in info.value.message
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_kwargs(constrained("json_schema", "{bad"), 100, guided_decoding_backend="xgrammar")
    assert info.value.param == "response_format"
    with_prompt = PreprocessedRequest(request_id="r", model="m", token_ids=[1, 2], prompt_logprobs=1)
    with pytest.raises(errors.InvalidRequest) as info:
        sampling_kwargs(with_prompt, 100)
    assert info.value.param == "prompt_logprobs"


def test_top_logprobs_best_first_from_rank_maps() -> None:
    class Lp:
        def __init__(self, v: float, rank: int) -> None:
            self.logprob, self.rank = v, rank

    # The sampled token (rank 9) comes with the top 2.
    diff = [{4: Lp(-3.0, 9), 1: Lp(-0.2, 1), 2: Lp(-0.9, 2)}]
    assert top_logprobs(diff, [4], 2) == [[(1, -0.2), (2, -0.9)]]
    assert sampled_logprobs(diff, [4]) == [-3.0]
    assert top_logprobs(diff, [4], 0) is None and top_logprobs([-0.1], [4], 2) is None


@pytest.mark.parametrize(("reason", "want"), [(None, None), ("stop", "stop"), ("length", "length"),
                                              ("cancelled", "cancelled"), ("timeout", "cancelled")])
def test_finish_reasons(reason: str | None, want: str | None) -> None:
    assert finish_reason(reason) == want


def test_logprobs_floats_or_maps() -> None:
    class Lp:
        def __init__(self, v: float) -> None:
            self.logprob = v

    assert sampled_logprobs([-0.1, -0.2], [4, 5]) == [-0.1, -0.2]
    assert sampled_logprobs([{4: Lp(-0.3)}], [4]) == [-0.3]
    assert sampled_logprobs([], [4]) is None


# --------------------------------------------------------------------------- KV events

BLOCK = 4


def stored(event_id: int, tokens: list[int], hashes: list[int], parent: int | None, level: int = 0) -> dict[str, Any]:
    blocks = [
        {"type": "stored_block", "block_hash": h,
         "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens[i * BLOCK:(i + 1) * BLOCK]],
         "cache_level": level, "priority": 35}
        for i, h in enumerate(hashes)
    ]
    return {"event_id": event_id, "data": {"type": "stored", "parent_hash": parent, "blocks": blocks}, "window_size": 1024}


def collect() -> tuple[list[KvEventData], TrtllmKvEvents]:
    seen: list[KvEventData] = []
    return seen, TrtllmKvEvents(seen.append, BLOCK)


def test_stored_chain_is_rehashed_across_events() -> None:
    seen, ev = collect()
    tokens = list(range(50, 66))
    ev.apply({"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [512, 0]}})
    ev.apply(stored(1, tokens[:8], [-11, 22], None))
    ev.apply(stored(2, tokens[8:], [33, 44], 22))  # continues the chain from a later event
    got = [h for e in seen if isinstance(e, BlockStored) for h in e.block_hashes]
    assert got == block_hashes(tokens, BLOCK)
    assert ev.total_blocks == 512
    ev.apply({"event_id": 3, "data": {"type": "removed", "block_hashes": [44]}})
    assert seen[-1] == BlockRemoved(block_hashes=[block_hashes(tokens, BLOCK)[-1]], tier="device")


def test_partial_tail_block_is_not_routed() -> None:
    seen, ev = collect()
    ev.apply(stored(0, list(range(6)), [1, 2], None))  # 4 tokens + a 2-token tail
    assert [h for e in seen if isinstance(e, BlockStored) for h in e.block_hashes] == block_hashes(list(range(4)), BLOCK)
    assert ev.partial_blocks == 1


def test_offloaded_blocks_go_to_the_host_tier() -> None:
    seen, ev = collect()
    tokens = list(range(8))
    ev.apply(stored(0, tokens, [1, 2], None, level=1))
    assert seen == [BlockStored(block_hashes=block_hashes(tokens, BLOCK), parent_hash=None, tier="host")]


def test_lost_events_clear_the_workers_blocks() -> None:
    seen, ev = collect()
    ev.apply(stored(0, list(range(4)), [1], None))
    ev.apply(stored(5, list(range(4, 8)), [2], None))
    assert any(isinstance(e, AllBlocksCleared) for e in seen)


def test_updated_events_carry_nothing() -> None:
    seen, ev = collect()
    ev.apply({"event_id": 0, "data": {"type": "updated", "block_hash": 1,
                                      "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0}}})
    assert seen == []


# ------------------------------------------------------------------------------- load


def test_iteration_stats_become_load_metrics() -> None:
    stats = {"numActiveRequests": 6, "numQueuedRequests": 2,
             "inflightBatchingStats": {"numContextRequests": 1, "numGenRequests": 5},
             "kvCacheStats": {"maxNumBlocks": 1000, "freeNumBlocks": 700, "usedNumBlocks": 300, "tokensPerBlock": 32}}
    for form in (stats, json.dumps(stats)):
        load = load_from_stats(form)
        assert (load.active_requests, load.waiting_requests) == (5, 3)
        assert (load.kv_active_blocks, load.kv_total_blocks) == (300, 1000)
