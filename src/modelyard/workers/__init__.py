"""Proxy workers: more processes serving the same port, the gateway's process deciding."""
