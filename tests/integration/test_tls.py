"""TLS and mutual TLS on the gRPC port, with tritonclient on loopback and certificates made by the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from certs import CA, Issued
from live_server import ServerProcess, frontend_flags, start_server, tidal_command
from onnx_models import SIMPLE_CONFIG, add_sub, write_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-repo")
    write_config(root / "simple", SIMPLE_CONFIG)
    add_sub(root / "simple" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "ca"), CA(folder, "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True, stem="server"),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("client", server=False),
        "folder": folder,
    }


def _serve(repo: Path, server: Issued, *extra: str) -> Iterator[ServerProcess]:
    srv = start_server(repo, "--no-metrics", "--tls-cert", str(server.cert), "--tls-key", str(server.key), *extra)
    yield srv
    assert srv.stop() == 0, srv.log()


def _client(srv: ServerProcess, ca: Path, cert: Issued | None = None) -> tc.InferenceServerClient:
    mine = {} if cert is None else {"private_key": str(cert.key), "certificate_chain": str(cert.cert)}
    return tc.InferenceServerClient(srv.url, ssl=True, root_certificates=str(ca), **mine)


def _infer(client: tc.InferenceServerClient) -> np.ndarray:
    x = np.ones((1, 16), np.float32)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    return client.infer("simple", inputs, client_timeout=30).as_numpy("OUTPUT0")


def logged(srv: ServerProcess, text: str, within_s: float = 30.0) -> bool:
    """Whether the server logs `text` (its output is read by a thread, so a line may arrive a little later)."""
    deadline = time.monotonic() + within_s
    while text not in srv.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _refused(client: tc.InferenceServerClient) -> str:
    with pytest.raises(InferenceServerException) as err:
        client.is_server_live(client_timeout=10)
    return str(err.value.status())


def test_tls_serves_tritonclient_and_refuses_plaintext(repo: Path, pki: dict) -> None:
    for srv in _serve(repo, pki["server"]):
        client = _client(srv, pki["ca"].path)
        assert client.is_server_live()
        np.testing.assert_array_equal(_infer(client), np.full((1, 16), 2, np.float32))
        assert "UNAVAILABLE" in _refused(tc.InferenceServerClient(srv.url))
        # A client that trusts another CA does not accept the server's certificate.
        other = CA(pki["folder"], "untrusted-ca")
        assert "UNAVAILABLE" in _refused(_client(srv, other.path))


def test_mutual_tls_takes_good_client_certificates_and_refuses_the_rest(repo: Path, pki: dict) -> None:
    for srv in _serve(repo, pki["server"], "--tls-client-ca", str(pki["ca"].path)):
        good = _client(srv, pki["ca"].path, pki["client"])
        assert good.is_server_live()
        assert _infer(good).shape == (1, 16)
        assert "UNAVAILABLE" in _refused(_client(srv, pki["ca"].path))  # no client certificate
        assert "UNAVAILABLE" in _refused(_client(srv, pki["ca"].path, pki["stranger"]))  # another CA's
        assert good.is_server_live()  # the refusals touched nobody else


def test_certificates_are_reloaded_without_a_restart_or_a_failed_request(
    repo: Path, tmp_path: Path, pki: dict
) -> None:
    ca1, ca2 = CA(tmp_path, "first"), CA(tmp_path, "second")
    first = ca1.issue("server", server=True, stem="live")
    for srv in _serve(repo, first):
        before = _client(srv, ca1.path)
        assert _infer(before).shape == (1, 16)
        ca2.issue("server", server=True, stem="live")  # the renewal replaces both files
        after = _client(srv, ca2.path)
        assert _infer(after).shape == (1, 16)  # a new connection gets the new certificate
        assert _infer(before).shape == (1, 16)  # the open one keeps working
        assert "UNAVAILABLE" in _refused(_client(srv, ca1.path))  # the old certificate is gone for new ones
        assert logged(srv, "TLS certificate reloaded")
        # The HTTPS port follows the same files, and the change was loaded and logged once for both.
        assert _https_status(srv, ca2.path) == 200
        with pytest.raises(OSError):
            _https_status(srv, ca1.path)
        assert srv.log().count("TLS certificate reloaded") == 1


def _https_status(srv: ServerProcess, ca: Path) -> int:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    return urllib.request.urlopen(f"https://{srv.http_url}/v2/health/ready", context=context, timeout=10).status


def test_a_broken_renewal_keeps_the_previous_certificate(repo: Path, tmp_path: Path) -> None:
    ca = CA(tmp_path, "ca")
    live = ca.issue("server", server=True, stem="live")
    for srv in _serve(repo, live):
        live.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")
        assert _client(srv, ca.path).is_server_live()  # the handshake still uses the old pair
        assert logged(srv, "cannot be used; the previous certificate stays")


@pytest.mark.parametrize("flags", [("--tls-cert", "server.crt"), ("--tls-key", "server.key"), ()])
def test_tls_flags_are_checked_at_start_up(repo: Path, pki: dict, flags: tuple[str, ...]) -> None:
    folder: Path = pki["folder"]
    args = [flag if flag.startswith("--") else str(folder / flag) for flag in flags]
    if not args:  # a key that does not belong to the certificate
        args = ["--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["client"].key)]
    with pytest.raises(RuntimeError, match="tidal exited with 2") as err:
        start_server(repo, "--no-metrics", *args)
    assert "--tls" in str(err.value)


def test_http_is_https_with_the_same_files_and_client_certificates(repo: Path, pki: dict) -> None:
    import ssl
    import urllib.request

    for srv in _serve(repo, pki["server"], "--tls-client-ca", str(pki["ca"].path)):
        url = f"https://{srv.http_url}/v2/health/ready"
        context = ssl.create_default_context(cafile=str(pki["ca"].path))
        with pytest.raises(OSError):  # no client certificate: refused at the handshake
            urllib.request.urlopen(url, context=context, timeout=10)
        context.load_cert_chain(pki["client"].cert, pki["client"].key)
        assert urllib.request.urlopen(url, context=context, timeout=10).status == 200


def test_tidal_health_and_control_reach_a_mutual_tls_port(repo: Path, pki: dict) -> None:
    mine = ["--tls-ca", str(pki["ca"].path), "--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]
    for srv in _serve(repo, pki["server"], "--tls-client-ca", str(pki["ca"].path)):
        health = tidal_command("health", "-u", srv.url, *mine)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
        status = tidal_command("control", "-u", srv.url, *mine, "status")
        assert status.returncode == 0 and "simple:1" in status.stdout, status.stderr
        plaintext = tidal_command("health", "-u", srv.url, "--timeout-s", "5")
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_the_native_front_end_refuses_tls_at_start_up(repo: Path, pki: dict) -> None:
    flags = frontend_flags("native")
    with pytest.raises(RuntimeError, match="tidal exited with 2") as err:
        start_server(repo, "--no-metrics", "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
                     *flags)
    assert "--frontend native serves plaintext only" in str(err.value)
