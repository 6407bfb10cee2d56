"""The HTTP API: OpenAI routes, seed-compatible routes, admin routes."""
