"""What the gateway's process tells a proxy worker it starts (one JSON argument)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from modelyard.observability.log_format import LogFormat
from modelyard.proxy.worker_messages import VERSION


class WorkerSettings(BaseModel):
    """What the owner tells a worker it starts (one JSON argument)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = VERSION
    name: str
    host: str
    port: int
    head_timeout: float
    admission_socket: str
    control_socket: str
    upstream_connect_timeout: float
    upstream_read_timeout: float
    shutdown_grace: float
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "INFO"
    log_format: LogFormat = "text"
