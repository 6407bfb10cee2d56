"""Checking a configuration before it runs: against its engine kinds, and against this
machine's GPUs (`modelyard check`, `modelyard serve`, a reload)."""
