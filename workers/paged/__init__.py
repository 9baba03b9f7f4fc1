"""The one continuous-batching engine core, shared by the built-in engine and the mocker.

Layout: `sequence.py` is one request's state (tokens, block table, progress, stop rules, its
wire SamplingOptions and the executor's per-request state); `scheduler.py` is continuous
batching over kvbm's block pool (token budget, chunked prefill, prefix hits, KVBM onboards and
the hold-back of requests waiting for disk reads, recompute preemption); `executor.py` is the
StepExecutor protocol (run one scheduled batch, return a StepResult; expose the KV layout,
memory and KVBM tiers); `engine.py` is PagedEngine, the workers.engine.Engine that owns the
pool, the scheduler, the request streams and the step loop, with the disaggregation operations
as public methods. Executors: workers/builtin/executor.py (torch: model, kernels, sampling on a
model thread) and workers/mocker/executor.py (timing model, seeded token streams). Nothing here
imports torch.
"""
