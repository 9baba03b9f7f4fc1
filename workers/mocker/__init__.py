"""The mocker: a simulated LLM engine with a real KV block pool and a timing model, for testing
routing and the frontend at fleet scale on CPUs."""
