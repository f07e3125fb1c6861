"""Issue 8, --web.config.file: TLS, client certificates and basic authentication, with real certificates
made by openssl(1) in the test (a CA, a server certificate, client certificates, and a second CA nobody
trusts), against the real exporter process."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import requests

from scrape import value
from serving import exporter_env, start_serving, write_yaml
from tools import require_tool

PASSWORD = "correct horse battery staple"


@dataclass
class PKI:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _issue(directory: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-set_serial",
             str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", f"{name}.crt", "-extfile",
             f"{name}.ext", cwd=directory)  # fmt: skip


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip


SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"


def client_ext(san: str) -> str:
    return f"subjectAltName={san}\nextendedKeyUsage=clientAuth\n"


@pytest.fixture(scope="module")
def pki():
    require_tool("openssl", "openssl")
    directory = Path(tempfile.mkdtemp(prefix="sopsnix-pki-"))
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _issue(directory, "server", "ca", "/CN=localhost", SERVER_EXT)
    _issue(directory, "renewed", "ca", "/CN=renewed", SERVER_EXT)
    _issue(directory, "client", "ca", "/CN=prometheus", client_ext("DNS:prometheus.test"))
    _issue(directory, "intruder", "ca", "/CN=intruder", client_ext("DNS:intruder.test"))
    _issue(directory, "rogue-client", "rogue-ca", "/CN=prometheus", client_ext("DNS:prometheus.test"))
    yield PKI(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def password_hash() -> str:
    # $2y$ as htpasswd -B writes it, the form exporter-toolkit's documentation shows.
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)


@pytest.fixture
def web(scratch):
    """web(web_config_dict, *flags) -> Served over HTTPS (or HTTP without TLS); stopped by PID afterwards."""
    started = []

    def start(web_config: dict, *flags: str):
        path = write_yaml(scratch / "web.yml", web_config)
        config = {"stores": [{"mountpoint": str(scratch / "absent.d"), "symlink": str(scratch / "absent")}],
                  "microvm": {"state_dir": str(scratch / "microvms")}}  # fmt: skip
        scheme = "https" if "tls_server_config" in web_config else "http"
        served = start_serving(scratch, config, f"--web.config.file={path}", *flags, scheme=scheme)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def tls_config(pki: PKI, **extra) -> dict:
    return {"cert_file": pki.path("server.crt"), "key_file": pki.path("server.key"), **extra}


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def peer_certificate_subject(port: int, pki: PKI) -> str:
    context = ssl.create_default_context(cafile=pki.path("ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]


# ---------------------------------------------------------------------------------------------------------
# TLS and basic authentication


def test_tls_and_basic_auth(pki, password_hash, web):
    served = web({"tls_server_config": tls_config(pki), "basic_auth_users": {"prometheus": password_hash}},
                 "--log.level=debug")  # fmt: skip
    ca = pki.path("ca.crt")
    good = ("prometheus", PASSWORD)

    response = served.get("/metrics", verify=ca, auth=good)
    assert response.status_code == 200
    assert value(response.text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert "WWW-Authenticate" not in response.headers
    assert served.get("/healthz", verify=ca, auth=good).text == "ok\n"

    for auth, headers in [
        (("prometheus", "wrong"), {}),
        (("alice", PASSWORD), {}),  # an unknown user, with the right password
        (("prometheus", PASSWORD + " "), {}),
        (None, {}),  # none at all
        (None, {"Authorization": "Basic !!!not-base64"}),
        (None, {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}),
        (None, {"Authorization": "Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()}),
    ]:
        for path in ("/metrics", "/healthz", "/"):
            response = served.get(path, verify=ca, auth=auth, headers=headers)
            assert response.status_code == 401, (auth, headers, path)
            assert response.headers["WWW-Authenticate"] == "Basic"
            assert "sopsnix" not in response.text
    assert requests.head(served.url + "/metrics", verify=ca, timeout=10).status_code == 401

    # Plain HTTP to the TLS port: a clear 400 in plain text, the connection closed, nothing served.
    plain = requests.get(f"http://127.0.0.1:{served.port}/metrics", auth=good, timeout=10)
    assert plain.status_code == 400 and "HTTPS server" in plain.text
    # Bytes that are neither TLS nor HTTP: the connection is just closed.
    assert raw_request(served.port, b"\x00\x01\x02\x03 garbage\r\n\r\n") == b""
    # A client that does not trust the server's CA fails on its side. With ssl itself, which closes the socket
    # of a failed handshake at once (requests leaves it to the garbage collector, through the traceback).
    rogue = ssl.create_default_context(cafile=pki.path("rogue-ca.crt"))
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            rogue.wrap_socket(sock, server_hostname="localhost")

    # And through all of that the server kept serving.
    assert served.get("/metrics", verify=ca, auth=good).status_code == 200
    assert served.process.poll() is None
    log = served.log()
    assert PASSWORD not in log and password_hash not in log
    assert "Traceback" not in log


def test_bcrypt_is_a_dependency_not_an_extra():
    """Every Prometheus exporter takes basic_auth_users: a plain `pip install .` must serve them."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() for requirement in project["dependencies"]]
    assert "bcrypt" in names
    # The old extra stays accepted by pip, and adds nothing.
    assert project["optional-dependencies"].get("basic-auth", []) == []


def test_basic_auth_without_tls(password_hash, web):
    served = web({"basic_auth_users": {"prometheus": password_hash, "grafana": password_hash}})
    assert served.get("/metrics").status_code == 401
    assert served.get("/metrics", auth=("grafana", "nope")).status_code == 401
    assert served.get("/metrics", auth=("grafana", PASSWORD)).status_code == 200
    assert served.get("/metrics", auth=("prometheus", PASSWORD)).status_code == 200


@pytest.mark.parametrize("client_auth_type", ["RequireAndVerifyClientCert", "VerifyClientCertIfGiven"])
def test_client_ca_is_enforced(pki, web, client_auth_type):
    served = web({"tls_server_config": tls_config(pki, client_auth_type=client_auth_type,
                                                  client_ca_file=pki.path("ca.crt"))})  # fmt: skip
    ca = pki.path("ca.crt")
    client = (pki.path("client.crt"), pki.path("client.key"))
    rogue = (pki.path("rogue-client.crt"), pki.path("rogue-client.key"))

    assert served.get("/metrics", verify=ca, cert=client).status_code == 200
    # A certificate from a CA the server does not trust is refused, whatever the policy.
    with pytest.raises(requests.exceptions.ConnectionError):
        served.get("/metrics", verify=ca, cert=rogue)
    if client_auth_type == "RequireAndVerifyClientCert":
        with pytest.raises(requests.exceptions.ConnectionError):
            served.get("/metrics", verify=ca)
    else:
        assert served.get("/metrics", verify=ca).status_code == 200
    assert served.get("/metrics", verify=ca, cert=client).status_code == 200


@pytest.fixture
def pki_web_dir(pki, scratch):
    """The PKI's files beside the web configuration, for relative paths."""
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(pki.path(name), scratch / name)
    return scratch


def test_client_allowed_sans(pki, pki_web_dir, web):
    served = web({"tls_server_config": tls_config(
        pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file="ca.crt",  # relative to the file
        client_allowed_sans=["prometheus.test"])})  # fmt: skip
    ca = pki.path("ca.crt")
    assert served.get("/metrics", verify=ca, cert=(pki.path("client.crt"), pki.path("client.key"))).status_code == 200
    # Signed by the trusted CA, but not a SAN on the list.
    with pytest.raises(requests.exceptions.ConnectionError):
        served.get("/metrics", verify=ca, cert=(pki.path("intruder.crt"), pki.path("intruder.key")))


def test_relative_paths_and_inline_pem(pki, pki_web_dir, web):
    served = web({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}})
    assert served.get("/metrics", verify=pki.path("ca.crt")).status_code == 200
    served.stop()
    inline = {"cert": Path(pki.path("server.crt")).read_text(), "key": Path(pki.path("server.key")).read_text()}
    served = web({"tls_server_config": inline, "http_server_config": {"headers": {
        "X-Content-Type-Options": "nosniff", "Strict-Transport-Security": "max-age=31536000"}}})  # fmt: skip
    response = served.get("/metrics", verify=pki.path("ca.crt"))
    assert response.status_code == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_tls_version_bounds(pki, web):
    served = web({"tls_server_config": tls_config(pki, min_version="TLS13")})
    context = ssl.create_default_context(cafile=pki.path("ca.crt"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(sock, server_hostname="localhost")
    assert served.get("/metrics", verify=pki.path("ca.crt")).status_code == 200


def test_rate_limit(web):
    served = web({"rate_limit": {"interval": "1m", "burst": 3}})
    codes = [served.get("/healthz").status_code for _ in range(6)]
    assert codes == [200, 200, 200, 429, 429, 429]


def test_changes_are_picked_up_without_a_restart(pki, password_hash, web, scratch):
    """As exporter-toolkit: a renewed certificate or a changed user is used from the next connection on; a
    file that turns bad refuses connections until it is fixed."""
    cert, key = scratch / "tls.crt", scratch / "tls.key"
    shutil.copy(pki.path("server.crt"), cert)
    shutil.copy(pki.path("server.key"), key)
    config = {"tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
              "basic_auth_users": {"prometheus": password_hash}}  # fmt: skip
    served = web(config)
    ca = pki.path("ca.crt")
    assert peer_certificate_subject(served.port, pki) == "localhost"

    # Renew: new files written in place (a new inode, as `install` or cert-manager leave them).
    for source, target in ((pki.path("renewed.crt"), cert), (pki.path("renewed.key"), key)):
        tmp = target.with_suffix(".new")
        shutil.copy(source, tmp)
        os.replace(tmp, target)
    assert peer_certificate_subject(served.port, pki) == "renewed"

    other_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    write_yaml(scratch / "web.yml", {**config, "basic_auth_users": {"prometheus": other_hash}})
    assert served.get("/metrics", verify=ca, auth=("prometheus", PASSWORD)).status_code == 401
    assert served.get("/metrics", verify=ca, auth=("prometheus", "rotated")).status_code == 200

    (scratch / "web.yml").write_text("tls_server_config: [not, a, mapping\n")
    with pytest.raises(requests.exceptions.ConnectionError):
        served.get("/metrics", verify=ca, auth=("prometheus", "rotated"))
    write_yaml(scratch / "web.yml", config)
    assert served.get("/metrics", verify=ca, auth=("prometheus", PASSWORD)).status_code == 200
    log = served.log()
    assert log.count("web configuration unusable") == 1 and "web configuration usable again" in log


# ---------------------------------------------------------------------------------------------------------
# A bad web configuration exits 2 with a message that names the field


def _bad_configs(pki: PKI, password_hash: str) -> dict[str, tuple[object, str]]:
    server = tls_config(pki)
    return {
        "not-yaml": ("tls_server_config: {cert_file: [\n", "not valid YAML"),
        "not-a-mapping": (["a", "list"], "top level must be a mapping"),
        "unknown-key": ({"tls_server_config": {**server, "cert_flie": "x"}}, "tls_server_config.cert_flie: unknown key"),
        "unknown-top-key": ({"basic_auth": {}}, "basic_auth: unknown key"),
        "missing-cert": ({"tls_server_config": {"key_file": server["key_file"]}}, "cert_file (or cert) is required"),
        "missing-key": ({"tls_server_config": {"cert_file": server["cert_file"]}}, "key_file (or key) is required"),
        "cert-not-found": ({"tls_server_config": {**server, "cert_file": "/nonexistent/server.crt"}},
                           "tls_server_config.cert_file: cannot read /nonexistent/server.crt"),
        "key-mismatch": ({"tls_server_config": {**server, "key_file": pki.path("client.key")}},
                         "tls_server_config.key_file: not a PEM private key matching"),
        "cert-is-a-key": ({"tls_server_config": {**server, "cert_file": pki.path("server.key")}},
                          "tls_server_config.cert_file: no PEM certificate"),
        "both-inline-and-file": ({"tls_server_config": {**server, "cert": "x"}}, "cert and cert_file are both set"),
        "client-auth-type": ({"tls_server_config": {**server, "client_auth_type": "Sometimes"}},
                             "tls_server_config.client_auth_type: must be one of"),
        "unverified-client-auth": ({"tls_server_config": {**server, "client_auth_type": "RequireAnyClientCert",
                                                          "client_ca_file": pki.path("ca.crt")}},
                                   "tls_server_config.client_auth_type: RequireAnyClientCert"),
        "verify-without-ca": ({"tls_server_config": {**server, "client_auth_type": "RequireAndVerifyClientCert"}},
                              "needs client_ca_file"),
        "ca-without-policy": ({"tls_server_config": {**server, "client_ca_file": pki.path("ca.crt")}},
                              "client_auth_type is NoClientCert"),
        "ca-not-pem": ({"tls_server_config": {**server, "client_auth_type": "RequireAndVerifyClientCert",
                                              "client_ca_file": pki.path("server.key")}},
                       "tls_server_config.client_ca_file: no PEM CA certificate"),
        "sans-without-verify": ({"tls_server_config": {**server, "client_allowed_sans": ["x"]}},
                                "client_allowed_sans needs client_auth_type RequireAndVerifyClientCert"),
        "min-version": ({"tls_server_config": {**server, "min_version": "SSL3"}}, "tls_server_config.min_version"),
        "min-above-max": ({"tls_server_config": {**server, "min_version": "TLS13", "max_version": "TLS12"}},
                          "min_version TLS13 is above max_version TLS12"),
        "cipher-suite": ({"tls_server_config": {**server, "cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA"]}},
                         "tls_server_config.cipher_suites: unknown TLS 1.2 cipher suite(s) TLS_RSA_WITH_RC4_128_SHA"),
        "curves": ({"tls_server_config": {**server, "curve_preferences": ["X25519"]}},
                   "tls_server_config.curve_preferences: not supported"),
        "plain-password": ({"basic_auth_users": {"prometheus": "hunter2-plain-text"}},
                           "basic_auth_users.prometheus: not a bcrypt hash"),
        "bad-user": ({"basic_auth_users": {"a:b": password_hash}}, "basic_auth_users: a user name must"),
        "header": ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
                   "http_server_config.headers.X-Frame-Options"),
        "unknown-header": ({"http_server_config": {"headers": {"Set-Cookie": "x"}}},
                           "http_server_config.headers.Set-Cookie: unknown key"),
        "rate-limit": ({"rate_limit": {"interval": "soon", "burst": 1}}, "rate_limit.interval: not a duration"),
    }


BAD_CASES = [
    "not-yaml", "not-a-mapping", "unknown-key", "unknown-top-key", "missing-cert", "missing-key", "cert-not-found",
    "key-mismatch", "cert-is-a-key", "both-inline-and-file", "client-auth-type", "unverified-client-auth",
    "verify-without-ca", "ca-without-policy", "ca-not-pem", "sans-without-verify", "min-version", "min-above-max",
    "cipher-suite", "curves", "plain-password", "bad-user", "header", "unknown-header", "rate-limit",
]  # fmt: skip
# Run as a real process for a sample; every case is checked through the same loader in-process.
PROCESS_CASES = {"not-yaml", "unknown-key", "key-mismatch", "plain-password", "verify-without-ca"}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_web_config(pki, password_hash, scratch, case):
    from sops_nix_exporter.http.webconfig import WebConfigError, WebConfigSource

    content, expected = _bad_configs(pki, password_hash)[case]
    path = scratch / "web.yml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_yaml(path, content)
    with pytest.raises(WebConfigError) as caught:
        WebConfigSource(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    # Never the value of a secret: not a key, not a password, not a hash.
    assert "PRIVATE KEY" not in message and "hunter2" not in message and password_hash not in message
    if case in PROCESS_CASES:
        config = write_yaml(scratch / "config.yml", {"stores": []})
        result = subprocess.run(
            [sys.executable, "-m", "sops_nix_exporter", "serve", "--web.listen-address=127.0.0.1:0", f"--config.file={config}",
             f"--web.config.file={path}"], env=exporter_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"sops-nix-exporter: web configuration error: {message}\n"


def test_missing_web_config_file(scratch):
    result = subprocess.run(
        [sys.executable, "-m", "sops_nix_exporter", "serve", "--web.listen-address=127.0.0.1:0",
         f"--web.config.file={scratch / 'nope.yml'}"], env=exporter_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot read the web configuration file: No such file or directory" in result.stderr


def test_slow_tls_handshake_does_not_block_others(pki, web):
    """The handshake runs in the connection's own thread: a client that opens a TLS connection and says
    nothing does not hold up the next one."""
    served = web({"tls_server_config": tls_config(pki)})
    silent = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(5)]
    try:
        half = socket.create_connection(("127.0.0.1", served.port))
        half.sendall(b"\x16\x03\x01\x02\x00")  # the first bytes of a ClientHello, then nothing
        start = time.monotonic()
        assert served.get("/metrics", verify=pki.path("ca.crt")).status_code == 200
        assert time.monotonic() - start < 5
        half.close()
    finally:
        for sock in silent:
            sock.close()
