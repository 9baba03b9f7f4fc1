"""The OpenAI-compatible HTTP frontend: schemas, preprocessing, routing calls, detokenizing, SSE.

Public API: `Frontend`, `FrontendConfig`, `add_frontend_args` (frontend.service) and
`create_app` (frontend.app) for tests that drive the ASGI app directly.
"""
