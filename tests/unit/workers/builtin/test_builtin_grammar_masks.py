"""grammar_masks.py: masks filled a step ahead equal masks filled in the step, through a greedy
decode over random logits with rows joining and leaving; a matcher moved on since its mask was
filled ahead gets a fresh one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from dynamo.wire import OutputConstraint
from workers.builtin.grammar_masks import GrammarMasks
from workers.structured import GrammarCompiler, MaskFiller, allocate_bitmask

MODEL_DIR = Path(__file__).resolve().parents[4] / "models" / "dynamo-tiny"
ITEM = {"type": "object", "properties": {"k": {"enum": ["x", "yy"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["k", "n"], "additionalProperties": False}
CONSTRAINTS = [
    OutputConstraint("json_schema", json.dumps({"type": "array", "items": ITEM, "minItems": 30})),
    OutputConstraint("regex", r"([a-z]{1,4} ){40}"),
]


def test_masks_filled_ahead_equal_masks_filled_in_the_step() -> None:
    compiler = GrammarCompiler.from_model_dir(MODEL_DIR, 8192)
    masks = GrammarMasks(8192, max_batch=2)  # grows past it
    reference = MaskFiller(1)
    rng = random.Random(0)
    matchers = [compiler.compile(CONSTRAINTS[i % 2]).matcher() for i in range(6)]
    for step in range(25):
        # Rows come and go: a different subset (and order) each step.
        live = [m for m in matchers if rng.random() < 0.8 and not m.is_terminated()]
        rng.shuffle(live)
        if not live:
            continue
        constrained = list(enumerate(live))
        got = masks.masks(constrained).copy()
        expected = allocate_bitmask(len(live), 8192)
        reference.fill(expected, constrained)
        assert np.array_equal(got, expected), step
        logits = torch.randn(len(live), 8192, generator=torch.Generator().manual_seed(step))
        masks.apply(logits, got, list(range(len(live))))
        for row, matcher in constrained:
            assert matcher.accept(int(logits[row].argmax()))
        masks.fill_ahead(live)
        if step == 10:
            assert masks._pending is not None
            masks._pending.result()  # the fill ahead is done: only then may a matcher move
            live[0].accept(int(_any_allowed(live[0])))  # moved on behind the sampler's back
    assert masks.rows_filled_ahead > masks.rows_filled_in_step > 0
    masks.close()


def _any_allowed(matcher: object) -> int:
    bitmask = allocate_bitmask(1, 8192)
    matcher.fill_mask(bitmask, 0)  # type: ignore[attr-defined]
    bits = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")
    return int(np.flatnonzero(bits)[0])
