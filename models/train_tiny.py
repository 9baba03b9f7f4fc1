"""Trains the default model (models/dynamo-tiny) briefly on CPU on its tokenizer's own corpus,
CPython's pydoc_data.topics, and writes model.safetensors (bf16) next to its config.json.

    python models/train_tiny.py models/dynamo-tiny [--minutes 4] [--threads 2] [--device cuda]

Deterministic for a given step count and device (fixed seed, fixed batch order); stops after
--steps or --minutes, whichever comes first. The shipped weights came from
`--device cuda --steps 3000 --batch 32` (70 s on one H100, final loss ~0.08): the model recites
pydoc text rather than answering. The CPU default (~1 s a step on 2 idle cores) gets to loss
~5 in 4 minutes, which reads as doc-flavoured word salad.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 1234


def corpus_ids(tokenizer: Tokenizer, eos_id: int) -> torch.Tensor:
    import pydoc_data.topics as topics

    ids: list[int] = []
    for _, text in sorted(topics.topics.items()):
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def train(
    model_dir: Path, steps: int, minutes: float, seq_len: int, batch: int, lr: float, device: str
) -> None:
    torch.manual_seed(SEED)
    raw = json.loads((model_dir / "config.json").read_text())
    config = LlamaConfig(**raw)
    model = LlamaForCausalLM(config).float().to(device)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    data = corpus_ids(tokenizer, raw["eos_token_id"])
    print(f"corpus: {data.numel()} tokens; model: {sum(p.numel() for p in model.parameters())} params")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(SEED)
    warmup = max(1, steps // 20)
    start = time.monotonic()
    model.train()
    step = 0
    for step in range(1, steps + 1):
        # Cosine schedule over the planned steps; stopping early on time just ends it sooner.
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.monotonic() - start
        if step % 25 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed:6.1f}s", flush=True)
        if elapsed > minutes * 60:
            break
    print(f"trained {step} steps in {time.monotonic() - start:.1f}s")

    # Tied embeddings: lm_head.weight is the embedding; save it once, as HF does.
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    out = model_dir / "model.safetensors"
    save_file(state, str(out), metadata={"format": "pt"})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")

    model.eval()
    prompt = tokenizer.encode("The for statement").ids
    with torch.no_grad():
        sample = model.generate(torch.tensor([prompt], device=device), max_new_tokens=40, do_sample=False)
    print("sample:", tokenizer.decode(sample[0].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?", default=Path(__file__).parent / "dynamo-tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.model_dir, args.steps, args.minutes, args.seq_len, args.batch, args.lr, args.device)


if __name__ == "__main__":
    main()
