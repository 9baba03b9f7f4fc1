"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over the same pipeline as
the OpenAI routes: schemas, request conversion, response and stream encoding, errors, routes."""

from frontend.anthropic.routes import register_anthropic_routes

__all__ = ["register_anthropic_routes"]
