"""One canonical form of every request target: what is checked is what the engine receives.

An HTTP server and the client library that forwards a request can read the same bytes
differently: a percent-encoded `#` decodes to a fragment that the forwarding URL drops, a
trailing tab or CR is stripped by URL parsing, `..` is resolved by one side only. A check run
on one reading while the engine gets another is how `/upstream/m/sleep%09` reached vLLM's
`/sleep`. So the request target is decoded once, here, and refused unless its decoded path
has exactly one meaning:

- no control characters or spaces, no `#`, `?`, `%` or backslash after decoding (nothing
  left that a later decoder or URL parser could reinterpret or trim);
- no `.` or `..` segments and no empty segments (`//`): nothing to resolve;
- valid UTF-8, and a query of URL characters only.

The routes, the checks and the upstream URL all use this one decoded path; `engine_path`
encodes it again in one fixed way, so the engine decodes exactly the checked string.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

# Characters a path may carry unencoded (RFC 3986 pchar and '/'), minus '%': the fast path.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*\Z")
# Brackets are not RFC 3986 query characters, but browsers and PHP-style clients send them raw.
_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?\[\]]|%[0-9A-Fa-f]{2})*\Z")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_DECODED = re.compile(r"[\x00-\x20\x7f#?%\\]")
_SAFE_IN_PATH = "/!$&'()*+,;=:@~"


class NonCanonical(ValueError):
    """A request target that cannot be given one meaning; the client gets a 400."""


@dataclass(frozen=True)
class CanonicalTarget:
    path: str  # decoded; the form every route and check sees
    query: str  # still encoded, as sent (the engine decodes it; no check reads it)


# Every request's target is read here; the same few targets come again and again. Only a
# target that passed is kept (a refusal raises, which the cache does not keep), as the frozen,
# shared answer; a bounded LRU, so odd targets cannot grow it.
@functools.lru_cache(maxsize=1024)
def canonical_target(raw_target: str) -> CanonicalTarget:
    """The one reading of a raw request target (`/path?query` as sent), or NonCanonical."""
    raw_path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise NonCanonical("the request target contains '#'")
    if query and _QUERY.match(query) is None:
        raise NonCanonical("the query contains characters that must be percent-encoded")
    if _PLAIN_PATH.match(raw_path) is not None:
        path = raw_path  # the usual case: nothing encoded, nothing to decode
    else:
        if not raw_path.startswith("/") or _ESCAPE.search(raw_path):
            raise NonCanonical("the path is not an absolute, well-encoded path")
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            raise NonCanonical("the path is not valid UTF-8") from None
        if _FORBIDDEN_DECODED.search(path):
            raise NonCanonical(
                "the path contains a space, a control character, '#', '?', '%' or '\\' "
                "(encoded or not)"
            )
        if any(ord(char) > 0x7F for char in raw_path):
            raise NonCanonical("the path contains characters that must be percent-encoded")
    if "//" in path or "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        raise NonCanonical("the path has empty, '.' or '..' segments; send it resolved")
    return CanonicalTarget(path, query)


def engine_path(path: str) -> str:
    """A decoded canonical path (or part of one) encoded for the upstream URL, one fixed way."""
    if _PLAIN_PATH.match(path) is not None:
        return path
    return quote(path, safe=_SAFE_IN_PATH)
