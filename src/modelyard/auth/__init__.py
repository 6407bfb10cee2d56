"""Who may use the gateway: API keys (stored as digests), per-key limits and usage counters.

Modules: `keys` (making, hashing and finding keys), `ratelimit` (requests per minute),
`usage` (persisted counters), `middleware` (the aiohttp middleware that puts a `Principal` on
each request), `exposure` (no keys means loopback only), `engine_paths` (engine control
endpoints that only an admin may reach), `commands` (`modelyard keys ...`).
"""
