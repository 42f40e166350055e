"""`nima-edge serve`: one process serving any exported artifact (every runtime) over an OpenAI-compatible
HTTP API, with a chat page at / (static files in static/, no build step, nothing from a CDN).

Modules: app (routes), schema (request validation), responses (OpenAI bodies, SSE), worker (one thread
and a bounded queue per model), guards (Host check, API key, security headers), launch (load, bind, run).
"""
