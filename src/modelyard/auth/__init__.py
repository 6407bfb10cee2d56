"""Who may use the gateway: API keys (stored as digests), per-key limits and usage counters.

Pure of the web framework (the web layer, `api.guards` and `api.access`, applies it; auth
never imports `api`). Modules: `keys` (making, hashing and finding keys), `principal` (who is
asking and what it may use), `authenticator` (a key or a refusal, rate limits, usage),
`ratelimit`, `usage` (persisted counters), `credentials` (headers that can carry a key: none
leaves the gateway), `origins` (which browsers may call it: Host, Origin, CORS), `exposure`
(no keys means loopback only), `engine_paths` (engine control endpoints that only an admin may
reach), `commands` (`modelyard keys ...`).
"""
