"""A traced request's spans inside the paged engine (dynamo/tracing.py): `engine.queue` (waiting
for the scheduler to admit it), `engine.prefill` (admission to its first token) and
`engine.decode` (first token to the end), children of the worker's span.

They are emitted when the request's stream ends, from times recorded on the way, so that the
step loop does no tracing work: the admission time is on the Sequence (set once, at its first
admission), and the first token's time is taken by a one-shot wrapper of the sequence's output
callback, which puts the plain callback back on that first call. An untraced request has none
of this (PagedEngine._serve makes an EngineSpans only for a request that carries a trace)."""

from __future__ import annotations

import time

from dynamo import tracing
from dynamo.wire import EngineOutput
from workers.paged.sequence import Sequence


class EngineSpans:
    __slots__ = ("_trace", "_seq", "_put", "_started_s", "_first_s", "_prefilled")

    def __init__(self, trace: str, seq: Sequence, prefilled: bool) -> None:
        """`prefilled`: its prompt was computed elsewhere (disaggregation); it decodes at once."""
        self._trace = trace
        self._seq = seq
        self._prefilled = prefilled
        self._started_s = time.perf_counter()
        self._first_s = self._started_s if prefilled else 0.0
        self._put = seq.on_output
        if not prefilled:
            seq.on_output = self._first_output

    def _first_output(self, output: EngineOutput) -> None:
        self._first_s = time.perf_counter()
        self._seq.on_output = self._put
        self._put(output)

    def emit(self) -> None:
        """The spans, once the request's stream has ended (finished, failed or cancelled)."""
        end_s = time.perf_counter()
        seq, trace, first_s = self._seq, self._trace, self._first_s
        if not self._prefilled:
            admitted_s = seq.admitted_s
            # Never admitted (cancelled or failed while waiting): it waited until the end.
            tracing.emit("engine.queue", trace, self._started_s, admitted_s or end_s)
            if admitted_s:
                attributes = {"dynamo.prompt_tokens": seq.num_prompt_tokens, "dynamo.cached_tokens": seq.cached_tokens or 0}
                tracing.emit("engine.prefill", trace, admitted_s, first_s or end_s, attributes)
        if first_s:
            tracing.emit("engine.decode", trace, first_s, end_s, {"dynamo.output_tokens": seq.num_generated})
