"""Chat template rendering, tokenization and the request fields a worker receives."""

from __future__ import annotations

from dynamo.wire import ModelCard
from frontend.preprocess import preprocess_chat, preprocess_completion
from frontend.schemas import decode_chat_request, decode_completion_request
from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import TINY_MODEL

CARD = ModelCard(served_model_name="tiny", model_path=TINY_MODEL, context_length=256, kv_block_size=16)


def test_tokenizer_config(tokenizer: ModelTokenizer) -> None:
    assert tokenizer.eos_token_ids == (3, 1)
    assert tokenizer.vocab_size == 8192


def test_chat_template_output(tokenizer: ModelTokenizer) -> None:
    req = decode_chat_request(
        b'{"model":"tiny","messages":[{"role":"system","content":"Be brief."},'
        b'{"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}]}'
    )
    text = tokenizer.render_chat(req.messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prepared = preprocess_chat(req, CARD, tokenizer, "r1")
    ids = prepared.request.token_ids
    assert ids[0] == tokenizer.tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert prepared.request.stop.max_tokens == 256 - len(ids)
    assert list(prepared.request.stop.stop_token_ids) == [3, 1]


def test_sampling_and_extensions_reach_the_wire(tokenizer: ModelTokenizer) -> None:
    req = decode_chat_request(
        b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"temperature":0.5,"top_p":0.9,'
        b'"seed":11,"max_completion_tokens":7,"ignore_eos":true,"min_tokens":2,"stop_token_ids":[42],'
        b'"top_k":5,"stream":true,"stream_options":{"include_usage":true},"stop":"##"}'
    )
    p = preprocess_chat(req, CARD, tokenizer, "r2")
    s, stop = p.request.sampling, p.request.stop
    assert (s.temperature, s.top_p, s.seed, s.top_k) == (0.5, 0.9, 11, 5)
    assert (stop.max_tokens, stop.min_tokens, stop.ignore_eos) == (7, 2, True)
    assert stop.stop_token_ids == [42]  # ignore_eos: EOS ids not added
    assert p.output.stop_strings == ("##",) and p.stream and p.include_usage


def test_completion_prompt_forms(tokenizer: ModelTokenizer) -> None:
    for raw, expected in (
        (b'"Hello"', tokenizer.encode("Hello", add_special_tokens=True)),
        (b'["Hello"]', tokenizer.encode("Hello", add_special_tokens=True)),
        (b"[1,2,3]", [1, 2, 3]),
        (b"[[4,5]]", [4, 5]),
    ):
        req = decode_completion_request(b'{"model":"tiny","prompt":' + raw + b"}")
        assert preprocess_completion(req, CARD, tokenizer, "r").request.token_ids == expected


def test_echo(tokenizer: ModelTokenizer) -> None:
    req = decode_completion_request(b'{"model":"tiny","prompt":"Hello","echo":true}')
    assert preprocess_completion(req, CARD, tokenizer, "r").choices[0].echo_text == "Hello"
