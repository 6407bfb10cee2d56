"""Sharing busy engines between keys: fair queues, per-model request policy, keep_alive."""
