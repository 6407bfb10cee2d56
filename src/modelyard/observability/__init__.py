"""Observability: events, metrics and logs."""
