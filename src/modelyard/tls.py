"""HTTPS in the gateway: a server TLS context whose certificate can be replaced while it runs.

`tls: {cert, key}` in the config turns it on. `ServerCertificate.reload()` (wired to SIGHUP in
`modelyard.server`) reads both files again: connections already open keep the certificate
they were made with, every new handshake gets the new one, and nothing is dropped. A pair that
cannot be loaded (missing file, key that does not match, half-written file during a renewal)
leaves the old certificate in place and says why in the log.

How: the listening socket's context has an SNI callback, which OpenSSL calls for every
ClientHello (with or without a server name); it points the new connection at the context that
holds the current certificate. Swapping contexts, rather than calling `load_cert_chain()` again
on the live one, means a failed load can never leave a new certificate next to an old key.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

log = logging.getLogger("modelyard.tls")


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file and the problem."""


def certificate_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server context holding this certificate chain and key (TLS 1.2 or later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except FileNotFoundError as error:
        raise TlsError(f"tls: cannot read {error.filename}: no such file") from None
    except PermissionError as error:
        raise TlsError(f"tls: cannot read {error.filename}: permission denied") from None
    except ssl.SSLError as error:
        # The key's text is never part of the message, only what OpenSSL says is wrong.
        reason = error.reason or error.strerror or str(error)
        raise TlsError(f"tls: {cert} and {key} cannot be used together: {reason}") from None
    except OSError as error:
        raise TlsError(f"tls: cannot read {cert} or {key}: {error.strerror or error}") from None
    return context


class ServerCertificate:
    """The gateway's certificate: `context` listens, `reload()` swaps in the files' new content."""

    def __init__(self, cert: str | Path, key: str | Path) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self._current = certificate_context(self.cert, self.key)  # raises TlsError
        self._lock = threading.Lock()
        self.reloads = 0
        self.context = certificate_context(self.cert, self.key)
        self.context.sni_callback = self._choose_context

    def _choose_context(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self._current

    def reload(self) -> bool:
        """Read the certificate and key again. True if the new pair is in use from now on."""
        with self._lock:
            try:
                fresh = certificate_context(self.cert, self.key)
            except TlsError as error:
                log.error("TLS certificate not reloaded, the previous one stays: %s", error)
                return False
            self._current = fresh
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True
