"""OpenAI's Responses API (/v1/responses) over the same pipeline as chat completions: schemas,
request conversion, response and event encoding, the response store, routes."""

from frontend.responses.routes import register_responses_routes

__all__ = ["register_responses_routes"]
