"""L2 prefetch of coming weights inside a decode step's CUDA graph.

A small-batch decode step is a stream of weight reads, yet HBM idles for a third of it: the
kernels between the projections (norms, RoPE, attention over short contexts, SiLU) read little,
and a small projection (qkv, o) cannot put enough reads in flight to stream at full bandwidth.
A prefetch plan names points of the fused forward pass and, at each, weights that a later
projection will read; there the forward forks a side branch off the graph's stream whose one
kernel asks the L2 for those bytes and exits without waiting for them. The projection finds
them in L2 (50 MB on an H100), or at least in flight. A hint only: results are bit for bit the
same with or without a plan.

Plan syntax: `point:weight[*fraction],...;point:...`. Points, in the order a layer reaches them:
`layer` (its start), `attn` (after the qkv projection), `o` (after attention), `mlp` (after
the o projection), `down` (after gate_up). Weights: `qkv`, `o`, `gate_up`, `down` of the same
layer, `next_qkv` and `next_o` of the next one (the last layer has none), `lm_head`; a fraction
takes the leading part of a matrix (the rows a projection's first programs read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from workers.builtin.gpu_kernels import kernels, triton_available

if TYPE_CHECKING:
    from workers.builtin.model import LlamaForCausalLM

POINTS = ("layer", "attn", "o", "mlp", "down")
WEIGHTS = ("qkv", "o", "gate_up", "down", "next_qkv", "next_o", "lm_head")

# The plan decode graphs are captured with ("" for none); chosen by benchmarks/builtin_gpu.py
# --prefetch-plans on an H100 (benchmarks/RESULTS.md).
DECODE_PLAN = ""


@dataclass(frozen=True, slots=True)
class PrefetchItem:
    weight: str
    fraction: float = 1.0


def parse_plan(spec: str) -> dict[str, tuple[PrefetchItem, ...]]:
    """The plan's items per point; ValueError names what is wrong."""
    plan: dict[str, tuple[PrefetchItem, ...]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        point, sep, items = part.partition(":")
        point = point.strip()
        if not sep or point not in POINTS:
            raise ValueError(f"prefetch plan part {part!r}: expected point:weights with a point of {POINTS}")
        if point in plan:
            raise ValueError(f"prefetch plan names point {point!r} twice")
        parsed = []
        for item in filter(None, (i.strip() for i in items.split(","))):
            weight, star, frac = item.partition("*")
            weight = weight.strip()
            if weight not in WEIGHTS:
                raise ValueError(f"prefetch plan item {item!r}: weight must be one of {WEIGHTS}")
            fraction = float(frac) if star else 1.0
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"prefetch plan item {item!r}: fraction must be in (0, 1]")
            parsed.append(PrefetchItem(weight, fraction))
        plan[point] = tuple(parsed)
    return plan


def plan_bytes(model: LlamaForCausalLM, spec: str) -> dict[tuple[str, int], list[tuple[torch.Tensor, int]]]:
    """Each (point, layer)'s prefetches: a weight and the bytes of its leading part (a multiple
    of 16, as the bulk prefetch asks)."""
    layers = model.model.layers
    jobs: dict[tuple[str, int], list[tuple[torch.Tensor, int]]] = {}
    for point, items in parse_plan(spec).items():
        for i, layer in enumerate(layers):
            out = []
            for item in items:
                weight = _weight(model, i, item.weight)
                if weight is None:
                    continue
                nbytes = int(weight.numel() * weight.element_size() * item.fraction) // 16 * 16
                if nbytes:
                    out.append((weight, nbytes))
            if out:
                jobs[(point, i)] = out
    return jobs


def _weight(model: LlamaForCausalLM, i: int, name: str) -> torch.Tensor | None:
    layers = model.model.layers
    if name == "lm_head":
        return model.lm_head.weight
    if name.startswith("next_"):
        if i + 1 >= len(layers):
            return None
        i, name = i + 1, name[len("next_"):]
    layer = layers[i]
    module = {
        "qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,  # type: ignore[union-attr]
        "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj,  # type: ignore[union-attr]
    }[name]
    assert isinstance(module, nn.Linear)
    return module.weight


# A bulk prefetch (sm_90) asks the copy engine for SPAN bytes; without it (sm_80) each thread
# prefetches LINE_SPAN bytes line by line. A program issues one span per thread (4 warps), so a
# matrix spreads over several SMs.
SPAN, LINE_SPAN, PER_PROGRAM = 16 << 10, 4 << 10, 128
BULK: bool | None = None  # None: bulk where the GPU has it (benchmarks force either form)


def supported(device: torch.device) -> bool:
    """Bulk L2 prefetch needs sm_90 (Hopper); per-line prefetch (fallback) sm_80."""
    if device.type != "cuda":
        return False
    return triton_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def prefetch(weight: torch.Tensor, nbytes: int, sink: torch.Tensor, bulk: bool | None = None, span: int | None = None) -> None:
    """Ask the L2 for the first `nbytes` of `weight` on the current stream (one launch)."""
    if bulk is None:
        bulk = torch.cuda.get_device_capability(weight.device) >= (9, 0)
    span = min(span or (SPAN if bulk else LINE_SPAN), nbytes)
    if not bulk:
        span = max(128, span // 128 * 128)
    spans = -(-nbytes // span)
    programs = -(-spans // PER_PROGRAM)
    base = weight.view(-1).view(torch.uint8)
    kernels().l2_prefetch[(programs,)](base, nbytes, span, sink, PER_PROGRAM=PER_PROGRAM, BULK=bulk, num_warps=4)


class L2Prefetch:
    """A plan bound to a model's weights and a side stream: the fused forward calls it at each
    point; `join` rejoins the side branch (before a graph capture ends)."""

    def __init__(self, model: LlamaForCausalLM, spec: str, device: torch.device, bulk: bool | None = None) -> None:
        self.jobs = plan_bytes(model, spec)
        self.stream = torch.cuda.Stream(device)
        self.sink = torch.zeros(1, dtype=torch.int32, device=device)
        self.bulk = BULK if bulk is None else bulk
        self._forked = False

    def __call__(self, point: str, layer: int) -> None:
        jobs = self.jobs.get((point, layer))
        if not jobs:
            return
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for weight, nbytes in jobs:
                prefetch(weight, nbytes, self.sink, self.bulk)
        self._forked = True

    def join(self) -> None:
        if self._forked:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._forked = False
