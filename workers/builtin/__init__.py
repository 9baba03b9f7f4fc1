"""The built-in engine: Llama-family models in plain PyTorch over a paged KV cache. The paged
core (workers/paged: scheduler, sequences, step loop, prefix caching, chunked prefill) runs it;
this package is its torch step executor (executor.py: model thread, KVBM copies, KV memory for
transfer) with the runner, model, kernels, loader and sampling. `BuiltinEngine` is the entry point."""
