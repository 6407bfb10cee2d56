"""Who is asking: an API key's name and what it may use. Pure: no web framework here."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool
    model_patterns: tuple[str, ...] = field(default=("*",))
    metrics: bool = False  # a scraper's key: /metrics and /metrics/engines

    @property
    def unrestricted(self) -> bool:
        """May use every model (so which model a request names cannot matter for access)."""
        return self.admin or "*" in self.model_patterns

    def may_use(self, *names: str) -> bool:
        """Whether any of `names` (a public name, the configured model) matches a pattern."""
        if "*" in self.model_patterns:
            return True  # what fnmatchcase(name, "*") says of every name, without a regex
        return any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.model_patterns for name in names
        )


# With no keys configured (loopback only), whoever can connect is trusted with everything.
ANONYMOUS = Principal("anonymous", admin=True)

# A request that passed no key check: an open route while keys exist, or a path that forgot to
# set one. It may use nothing: the default is to deny (issue 23), never the anonymous admin.
NOBODY = Principal("unauthenticated", admin=False, model_patterns=())
