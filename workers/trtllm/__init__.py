"""The TensorRT-LLM engine (`--engine trtllm`): the `tensorrt_llm` LLM API (`LLM`,
`generate_async`, `get_kv_cache_events_async`, `get_stats_async`) driven in-process. Written
against TensorRT-LLM 1.2.1 (PyPI `tensorrt-llm`); NOT VERIFIED against a running engine: see
docs/engines.md."""
