"""HTTPS in the gateway (`tls: {cert, key}`): verified by the openai SDK against a CA made here,
and certificates swapped on SIGHUP while connections stay open."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import RunningGateway, fake_model, free_port
from tests.deploy.certs import TestCA

CHAT = [{"role": "user", "content": "hello over TLS"}]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "pki")


def https_url(gateway: RunningGateway) -> str:
    return gateway.url.replace("http://", "https://")


def served_certificate(port: int, ca: TestCA) -> bytes:
    """The DER certificate a fresh TLS connection to the gateway gets, verified by `ca`."""
    context = ssl.create_default_context(cafile=str(ca.cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def der_of(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


def tls_gateway(gateway_factory, cert: Path, key: Path) -> RunningGateway:
    gateway: RunningGateway = gateway_factory(
        {"chat": fake_model("chat")}, tls={"cert": str(cert), "key": str(key)}
    )
    assert "listening on https://" in gateway.log_text()
    return gateway


def test_openai_sdk_verifies_the_gateway_against_the_test_ca(gateway_factory, ca) -> None:
    cert, key = ca.issue("server")
    gateway = tls_gateway(gateway_factory, cert, key)
    verified = openai.OpenAI(
        base_url=https_url(gateway) + "/v1",
        api_key="unused",
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca.cert))),
        max_retries=0,
    )
    assert [m.id for m in verified.models.list()] == ["chat"]
    reply = verified.chat.completions.create(model="chat", messages=CHAT)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    # A client that trusts only the usual CAs refuses the test CA's certificate...
    untrusting = openai.OpenAI(base_url=https_url(gateway) + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()
    # ...and plain HTTP on the TLS port gets no answer, while the gateway keeps serving.
    with pytest.raises(httpx.HTTPError):
        httpx.get(gateway.url + "/health", timeout=5)
    assert [m.id for m in verified.models.list()] == ["chat"]


def test_sighup_swaps_the_certificate_and_open_connections_stay_up(gateway_factory, ca) -> None:
    cert, key = ca.issue("server")
    old_der = der_of(cert)
    gateway = tls_gateway(gateway_factory, cert, key)
    port = int(gateway.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(ca.cert))
    kept = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    kept.request("GET", "/v1/models")
    assert kept.getresponse().read()
    assert kept.sock is not None
    kept_socket = kept.sock

    # A renewal: new key and certificate written over the old files, then SIGHUP (as
    # certbot's deploy hook or `systemctl reload modelyard` would do).
    new_cert, new_key = ca.issue("renewed")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while served_certificate(port, ca) == old_der:
        assert time.monotonic() < deadline, "the new certificate was not served after SIGHUP"
        time.sleep(0.05)
    assert served_certificate(port, ca) == der_of(new_cert)

    # The connection opened before the swap is the same socket, still answering, still on
    # the certificate it was made with.
    kept.request("POST", "/v1/chat/completions", body=_chat_body(), headers=_json())
    response = kept.getresponse()
    assert response.status == 200, response.read()
    assert b"choices" in response.read()
    assert kept.sock is kept_socket
    assert kept_socket.getpeercert(binary_form=True) == old_der
    kept.close()
    assert "TLS certificate reloaded" in gateway.log_text()
    assert gateway.process.poll() is None


def test_a_broken_pair_on_sighup_keeps_the_certificate_in_use(gateway_factory, ca) -> None:
    cert, key = ca.issue("server")
    gateway = tls_gateway(gateway_factory, cert, key)
    port = int(gateway.url.rsplit(":", 1)[1])
    in_use = der_of(cert)
    other_cert, other_key = ca.issue("other")
    # Hostile or half-done renewals: a key that does not match, then a truncated certificate.
    key.write_bytes(other_key.read_bytes())
    gateway.process.send_signal(signal.SIGHUP)
    _wait_for_log(gateway, "TLS certificate not reloaded", 1)
    assert served_certificate(port, ca) == in_use
    cert.write_bytes(other_cert.read_bytes()[:100])
    gateway.process.send_signal(signal.SIGHUP)
    _wait_for_log(gateway, "TLS certificate not reloaded", 2)
    assert served_certificate(port, ca) == in_use
    assert "PRIVATE KEY" not in gateway.log_text()  # the key's text is never logged
    # Both files fixed: the next SIGHUP loads them.
    cert.write_bytes(other_cert.read_bytes())
    gateway.process.send_signal(signal.SIGHUP)
    _wait_for_log(gateway, "TLS certificate reloaded", 1)
    assert served_certificate(port, ca) == der_of(other_cert)


@pytest.mark.parametrize("problem", ["missing", "mismatched", "not-pem"])
def test_serve_refuses_a_certificate_it_cannot_use(tmp_path: Path, ca, problem: str) -> None:
    cert, key = ca.issue("server")
    if problem == "missing":
        cert = tmp_path / "nowhere.pem"
    elif problem == "mismatched":
        key = ca.issue("other")[1]
    else:
        cert.write_text("-----BEGIN CERTIFICATE-----\n\x00garbage\n")
    config = tmp_path / "modelyard.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "state_dir": str(tmp_path / "state"),
                "tls": {"cert": str(cert), "key": str(key)},
            }
        )
    )
    for verb in ("check", "serve"):  # `check` (systemd's ExecStartPre) refuses it too
        result = subprocess.run(
            [sys.executable, "-m", "modelyard", verb, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert "modelyard: tls:" in result.stderr
        assert "Traceback" not in result.stderr
        assert "PRIVATE KEY" not in result.stderr


def _wait_for_log(gateway: RunningGateway, text: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while gateway.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in the log"
        time.sleep(0.05)


def _chat_body() -> str:
    import json

    return json.dumps({"model": "chat", "messages": CHAT})


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_reload_actions_all_run_even_when_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    # SIGHUP runs every reload action (TLS here; the config reload joins the same list): one
    # that raises is logged and the others still run.
    from modelyard.server import run_reload_actions

    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("cannot reload this part")

    run_reload_actions([broken, lambda: ran.append("tls")])
    assert ran == ["broken", "tls"]
    assert "cannot reload this part" in caplog.text
