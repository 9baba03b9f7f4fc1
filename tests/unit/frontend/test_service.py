"""Frontend as a component: uvicorn on a real socket, driven by the official openai client."""

from __future__ import annotations

import argparse
import socket

import openai
import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from frontend.service import Frontend, FrontendConfig, add_frontend_args
from frontend.tokenizer import ModelTokenizer
from router.args import add_router_args
from router.base import RoundRobinRouter
from tests.unit.frontend.conftest import MODEL, ScriptedWorker

TEXT = "Hello over a real socket."


async def test_frontend_serves_openai_client(tokenizer: ModelTokenizer) -> None:
    async with await Runtime.create(RuntimeConfig()) as runtime:
        worker_rt = runtime.sibling()
        worker = ScriptedWorker(worker_rt, tokenizer.encode(TEXT, add_special_tokens=False))
        await worker.start()
        config = FrontendConfig(http_host="127.0.0.1", http_port=0)
        async with Frontend(runtime, config, lambda card: RoundRobinRouter()) as frontend:
            await frontend.manager.wait_until(frontend.manager.ready, 5)
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="x", max_retries=0)
            resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert resp.choices[0].message.content == TEXT
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
            assert chunks[-1].usage is not None
            try:
                await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
            except openai.NotFoundError as exc:
                assert "nope" in str(exc)
            else:
                raise AssertionError("unknown model accepted")
            await client.close()
        await worker_rt.shutdown()


async def test_a_port_in_use_fails_clearly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with await Runtime.create(RuntimeConfig()) as runtime:
            config = FrontendConfig(http_host="127.0.0.1", http_port=port)
            with pytest.raises(errors.DynamoError, match=f"could not listen on 127.0.0.1:{port}"):
                async with Frontend(runtime, config, lambda card: RoundRobinRouter()):
                    pass


def test_args_become_config(monkeypatch: object) -> None:
    parser = argparse.ArgumentParser()
    add_frontend_args(parser)
    add_router_args(parser)  # --router-mode is the router's flag; the frontend reads it
    config = FrontendConfig.from_args(parser.parse_args(["--http-port", "9001", "--router-mode", "random"]))
    assert config.http_port == 9001 and config.router_mode == "random"
