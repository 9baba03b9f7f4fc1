"""The mocker: a simulated LLM engine for testing routing and the frontend at fleet scale on
CPUs. It is the paged core (workers/paged: real block pool, scheduler, step loop) with a timing
executor (executor.py: the timing model's step durations, seeded token streams, simulated
KVBM) in place of a forward pass. `MockerEngine` is the entry point."""
