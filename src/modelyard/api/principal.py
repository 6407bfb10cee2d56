"""Who is asking: the API key's name and what it may use. Set on each request by auth."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from aiohttp import web

from modelyard.api.errors import ApiError
from modelyard.auth.engine_paths import is_engine_control, normalized
from modelyard.scheduler.names import Target

PRINCIPAL_KEY = "modelyard.principal"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool
    model_patterns: tuple[str, ...] = field(default=("*",))

    def may_use(self, target: Target) -> bool:
        names = {target.public_name, target.model}
        return any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.model_patterns for name in names
        )

    def require_model(self, target: Target) -> None:
        if not self.may_use(target):
            raise ApiError(
                403,
                f"this API key ({self.name}) may not use model {target.public_name!r}",
                "model_not_allowed",
                "model",
            )

    def require_admin(self) -> None:
        if not self.admin:
            raise ApiError(403, f"this API key ({self.name}) is not an admin key", "admin_required")

    def require_engine_path(self, path: str) -> None:
        """Engine control endpoints (`/sleep`, `/v1/load_lora_adapter`, ...) need an admin."""
        if not self.admin and is_engine_control(path):
            raise ApiError(
                403,
                f"{normalized(path.split('?', 1)[0])!r} controls the engine itself; "
                f"this API key ({self.name}) is not an admin key",
                "admin_required",
            )


# With no keys configured (loopback only), whoever can connect is trusted with everything.
ANONYMOUS = Principal("anonymous", admin=True)


def principal_of(request: web.Request) -> Principal:
    principal = request.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else ANONYMOUS
