"""The built-in engine: Llama-family models in plain PyTorch over a paged KV cache, with prefix
caching, continuous batching and chunked prefill. `BuiltinEngine` is the entry point."""
