"""dynamo: the runtime (discovery, request and event planes, wire types, config, metrics) and
the command-line entry points of a distributed LLM inference-serving system."""

__version__ = "0.1.0"
