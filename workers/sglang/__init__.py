"""The SGLang engine (`--engine sglang`): `sglang.Engine` driven in-process (its scheduler and
detokenizer are child processes it starts), its KV events re-hashed with the project's block
hash, its load snapshots turned into load metrics. Written against SGLang 0.5.23 (PyPI `sglang`);
NOT VERIFIED against a running engine: see docs/engines.md."""
