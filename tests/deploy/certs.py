"""A throwaway certificate authority for tests, made with the `openssl` command."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class TestCA:
    """A self-signed CA in `folder` that issues server certificates for 127.0.0.1/localhost."""

    __test__ = False  # not a pytest class
    folder: Path

    @property
    def cert(self) -> Path:
        return self.folder / "ca.pem"

    @classmethod
    def create(cls, folder: Path, name: str = "modelyard test CA") -> TestCA:
        folder.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder,
        )  # fmt: skip
        return cls(folder)

    def issue(self, stem: str, common_name: str = "localhost") -> tuple[Path, Path]:
        """A new key and a certificate for it, signed by this CA: (cert.pem, key.pem)."""
        extensions = self.folder / f"{stem}.ext"
        extensions.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
        )
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={common_name}",
            cwd=self.folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.pem", "-days", "1", "-extfile", extensions.name,
            cwd=self.folder,
        )  # fmt: skip
        return self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
