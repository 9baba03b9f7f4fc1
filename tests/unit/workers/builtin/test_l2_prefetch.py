"""l2_prefetch's plans on CPU: what a plan string means, what it refuses, and which weight bytes
each (point, layer) asks for. (The prefetch kernel itself needs a GPU:
test_builtin_gpu_kernels.py::test_decode_graphs_with_l2_prefetch_give_the_same_logits.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from workers.builtin.config import load_model_config
from workers.builtin.l2_prefetch import POINTS, PrefetchItem, parse_plan, plan_bytes, supported
from workers.builtin.loader import load_model


def test_a_plan_names_weights_per_point() -> None:
    assert parse_plan("") == {}
    assert parse_plan(" layer: qkv, o ; down:down*0.5,next_qkv;") == {
        "layer": (PrefetchItem("qkv"), PrefetchItem("o")),
        "down": (PrefetchItem("down", 0.5), PrefetchItem("next_qkv")),
    }
    assert set(parse_plan(";".join(f"{p}:lm_head" for p in POINTS))) == set(POINTS)


@pytest.mark.parametrize("spec, message", [
    ("qkv,o", "expected point:weights"),
    ("start:qkv", "expected point:weights"),
    ("layer:qkv;layer:o", "twice"),
    ("layer:wq", "weight must be one of"),
    ("layer:qkv*0", "fraction must be in"),
    ("layer:qkv*1.5", "fraction must be in"),
])
def test_a_bad_plan_is_refused_with_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_plan(spec)


def test_plan_bytes_resolve_each_layers_weights(model_dirs: Callable[[str], Path]) -> None:
    config = load_model_config(model_dirs("llama-gqa"))
    model = load_model(config, torch.float32, torch.device("cpu"))
    layers = model.model.layers
    last = len(layers) - 1
    jobs = plan_bytes(model, "layer:qkv,next_o;down:down*0.25;o:lm_head")

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    first = layers[0]
    assert [(w is first.self_attn.qkv_proj.weight, n) for w, n in jobs[("layer", 0)]][0] == (True, nbytes(first.self_attn.qkv_proj.weight))
    assert jobs[("layer", 0)][1][0] is layers[1].self_attn.o_proj.weight
    # The last layer has no next one: only its own qkv.
    assert [w for w, _ in jobs[("layer", last)]] == [layers[last].self_attn.qkv_proj.weight]
    down = layers[last].mlp.down_proj.weight
    (weight, quarter), = jobs[("down", last)]
    assert weight is down and quarter == nbytes(down) // 4 // 16 * 16 and quarter % 16 == 0
    assert all(jobs[("o", i)][0][0] is model.lm_head.weight for i in range(len(layers)))
    assert ("attn", 0) not in jobs and ("mlp", 0) not in jobs


def test_no_prefetch_off_cuda() -> None:
    assert not supported(torch.device("cpu"))
