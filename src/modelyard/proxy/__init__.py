"""Proxy: forwards requests to engines without buffering streams."""
