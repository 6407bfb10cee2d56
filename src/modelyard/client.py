"""The CLI's side of the admin API: one JSON request to a running gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call_gateway(
    url: str, key: str | None, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """Send one request; returns the JSON answer, or exits with the gateway's error message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = error.reason
        raise SystemExit(f"modelyard: {method} {path}: {error.code}: {message}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"modelyard: cannot reach {url}: {error.reason}") from None
