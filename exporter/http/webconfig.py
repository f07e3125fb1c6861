"""--web.config.file: TLS and basic authentication in the format Prometheus exporters share.

The file is exporter-toolkit's web configuration (docs/web-configuration.md of prometheus/exporter-toolkit):

    tls_server_config:
      cert_file: server.crt          # or `cert:` inline PEM
      key_file: server.key           # or `key:` inline PEM
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt         # or `client_ca:` inline PEM
      client_allowed_sans: [prometheus.example.org]
      min_version: TLS12
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hash
    rate_limit: {interval: 1s, burst: 20}

Relative paths are relative to the file's own directory, as in exporter-toolkit. Like exporter-toolkit, the
file (and the certificate and key files it names) is read again when it changes, so a renewed certificate
is served without a restart; whether TLS is on at all is fixed at start.

Every mistake becomes a WebConfigError whose message names the field, never the value: a key or a password
hash has no business in a log line. Two settings of exporter-toolkit cannot be honoured by Python's ssl
module and are refused rather than silently ignored: curve_preferences, and the client_auth_type values
that request a client certificate without verifying it (RequestClientCert, RequireAnyClientCert).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import bcrypt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from sops_nix_exporter.config import read_yaml, validate

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names (crypto/tls) of the TLS 1.2 suites, and OpenSSL's. TLS 1.3 suites are not configurable in Go
# either.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
ALLOWED_HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
)
BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# A bcrypt hash (cost 10) of random bytes nobody knows: an unknown user costs the same time as a known one.
UNKNOWN_USER_HASH = b"$2b$10$L6ZCbVupU6PuFNEw/P.eku8Nek0nkTf7G9wWN1VJfC5ZliCqUuXgO"
AUTH_CACHE_SIZE = 256


class WebConfigError(Exception):
    """The web configuration cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TLSServerConfig(_Strict):
    cert: str | None = None
    key: SecretStr | None = None
    client_ca: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_allowed_sans: list[str] = Field(default_factory=list)
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"
    cipher_suites: list[str] = Field(default_factory=list)
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[str] = Field(default_factory=list)

    @field_validator("client_auth_type")
    @classmethod
    def _client_auth_type(cls, value: str) -> str:
        if value in UNVERIFIED_CLIENT_AUTH_TYPES:
            raise ValueError(
                f"{value} (a client certificate requested but not verified) is not supported: "
                "use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with a client_ca_file"
            )
        if value not in CLIENT_AUTH_TYPES:
            raise ValueError(f"must be one of {', '.join(CLIENT_AUTH_TYPES)}")
        return value

    @field_validator("cipher_suites")
    @classmethod
    def _cipher_suites(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in CIPHER_SUITES]
        if unknown:
            raise ValueError(f"unknown TLS 1.2 cipher suite(s) {', '.join(unknown)} (Go's crypto/tls names)")
        return value

    @field_validator("curve_preferences")
    @classmethod
    def _curves(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError("not supported: Python's ssl module cannot set the key exchange groups; remove it")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TLSServerConfig:
        for inline, path in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
            if getattr(self, inline) is not None and getattr(self, path) is not None:
                raise ValueError(f"{inline} and {path} are both set: give one")
        if not self.has_cert:
            raise ValueError("cert_file (or cert) is required")
        if not self.has_key:
            raise ValueError("key_file (or key) is required")
        if self.client_auth_type != "NoClientCert" and not self.has_client_ca:
            raise ValueError(f"client_auth_type {self.client_auth_type} needs client_ca_file (or client_ca)")
        if self.has_client_ca and self.client_auth_type == "NoClientCert":
            raise ValueError("client_ca_file is set but client_auth_type is NoClientCert: set RequireAndVerifyClientCert")
        if self.client_allowed_sans and self.client_auth_type != "RequireAndVerifyClientCert":
            raise ValueError("client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            raise ValueError(f"min_version {self.min_version} is above max_version {self.max_version}")
        return self

    @property
    def has_cert(self) -> bool:
        return bool(self.cert or self.cert_file)

    @property
    def has_key(self) -> bool:
        return bool((self.key and self.key.get_secret_value()) or self.key_file)

    @property
    def has_client_ca(self) -> bool:
        return bool(self.client_ca or self.client_ca_file)


class Headers(_Strict):
    content_security_policy: str | None = Field(None, alias="Content-Security-Policy")
    x_frame_options: Literal["deny", "sameorigin", "DENY", "SAMEORIGIN"] | None = Field(None, alias="X-Frame-Options")
    x_content_type_options: Literal["nosniff"] | None = Field(None, alias="X-Content-Type-Options")
    x_xss_protection: str | None = Field(None, alias="X-XSS-Protection")
    strict_transport_security: str | None = Field(None, alias="Strict-Transport-Security")

    def items(self) -> list[tuple[str, str]]:
        values = self.model_dump(by_alias=True)
        return [(name, values[name]) for name in ALLOWED_HEADERS if values.get(name)]


class HTTPServerConfig(_Strict):
    http2: bool = True  # this server speaks HTTP/1.1 only; accepted so one file serves every exporter
    headers: Headers = Field(default_factory=Headers)


class RateLimit(_Strict):
    interval: str = "0s"
    burst: Annotated[int, Field(ge=0, strict=True)] = 0

    @field_validator("interval")
    @classmethod
    def _duration(cls, value: str) -> str:
        if value != "0" and (not value or not DURATION.match(value)):
            raise ValueError("not a duration such as 1s, 500ms or 1m30s")
        return value

    @property
    def interval_seconds(self) -> float:
        match = DURATION.match(self.interval)
        if self.interval == "0" or match is None:
            return 0.0
        groups = match.groups()[1::2]
        return sum(int(g) * unit for g, unit in zip(groups, DURATION_UNITS) if g)


def _bcrypt_hash(value: SecretStr) -> SecretStr:
    if not BCRYPT_HASH.match(value.get_secret_value()):
        raise ValueError("not a bcrypt hash ($2y$, the cost, $ and 53 characters, as `htpasswd -nB` writes)")
    return value


class WebConfig(_Strict):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = Field(default_factory=HTTPServerConfig)
    basic_auth_users: dict[str, Annotated[SecretStr, AfterValidator(_bcrypt_hash)]] = Field(default_factory=dict)
    rate_limit: RateLimit | None = None

    @field_validator("basic_auth_users")
    @classmethod
    def _user_names(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for user in users:
            if not user or ":" in user:
                raise ValueError("a user name must be non-empty and contain no ':'")
        return users


# -----------------------------------------------------------------------------------------------------------
# From the validated file to what the server uses


@dataclass(frozen=True)
class WebSettings:
    """One loaded configuration: what every connection is checked against."""

    tls: ssl.SSLContext | None = None
    client_allowed_sans: frozenset[str] = frozenset()
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: RateLimit | None = None
    files: tuple[str, ...] = ()  # every file it was read from, to notice a change

    @property
    def auth_required(self) -> bool:
        return bool(self.users)


def parse_web_config(data: Any, source: str) -> WebConfig:
    if isinstance(data, dict) and data.get("tls_server_config") == {}:
        data = {k: v for k, v in data.items() if k != "tls_server_config"}  # exporter-toolkit: TLS off
    return validate(WebConfig, data, source, WebConfigError)


def _read_pem(path: str, field_name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise WebConfigError(f"tls_server_config.{field_name}: cannot read {path}: {exc.strerror}") from None


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """load_cert_chain wants file names; memory-only files keep an inline key off every disk."""
    descriptors = []
    try:
        names = []
        for label, content in (("cert", cert), ("key", key)):
            fd = os.memfd_create(f"sops-nix-exporter-{label}", os.MFD_CLOEXEC)
            descriptors.append(fd)
            os.write(fd, content)
            names.append(f"/proc/self/fd/{fd}")
        context.load_cert_chain(names[0], names[1])
    finally:
        for fd in descriptors:
            os.close(fd)


def _tls_context(tls: TLSServerConfig, base: Path) -> tuple[ssl.SSLContext, list[str]]:
    files = []

    def resolve(path: str) -> str:
        resolved = str(base / path) if not os.path.isabs(path) else path
        files.append(resolved)
        return resolved

    cert = tls.cert.encode() if tls.cert else _read_pem(resolve(tls.cert_file or ""), "cert_file")
    key = tls.key.get_secret_value().encode() if tls.key else _read_pem(resolve(tls.key_file or ""), "key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError):
        raise WebConfigError("tls_server_config.min_version: this OpenSSL does not offer that version") from None
    cert_field = "cert" if tls.cert else "cert_file"
    key_field = "key" if tls.key else "key_file"
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise WebConfigError(f"tls_server_config.{cert_field}: no PEM certificate in it")
    try:
        _load_chain(context, cert, key)
    except ssl.SSLError:
        raise WebConfigError(
            f"tls_server_config.{key_field}: not a PEM private key matching tls_server_config.{cert_field}"
        ) from None
    if tls.has_client_ca:
        ca_field = "client_ca" if tls.client_ca else "client_ca_file"
        ca = tls.client_ca.encode() if tls.client_ca else _read_pem(resolve(tls.client_ca_file or ""), "client_ca_file")
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise WebConfigError(f"tls_server_config.{ca_field}: no PEM CA certificate in it") from None
        context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.cipher_suites:
        try:
            context.set_ciphers(":".join(CIPHER_SUITES[name] for name in tls.cipher_suites))
        except ssl.SSLError:
            raise WebConfigError("tls_server_config.cipher_suites: this OpenSSL offers none of them") from None
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return context, files


def load_web_config(path: str | Path) -> WebSettings:
    path = Path(path)
    data = read_yaml(path, "web configuration", WebConfigError)
    config = parse_web_config(data, str(path))
    files = [str(path)]
    context = None
    if config.tls_server_config is not None:
        try:
            context, tls_files = _tls_context(config.tls_server_config, path.parent)
        except WebConfigError as exc:
            raise WebConfigError(f"{path}: {exc}") from None
        files += tls_files
    sans = config.tls_server_config.client_allowed_sans if config.tls_server_config else []
    return WebSettings(
        tls=context,
        client_allowed_sans=frozenset(sans),
        users={user: hashed.get_secret_value().encode() for user, hashed in config.basic_auth_users.items()},
        headers=tuple(config.http_server_config.headers.items()),
        rate_limit=config.rate_limit if config.rate_limit and config.rate_limit.interval_seconds > 0 else None,
        files=tuple(files),
    )


def _signature(files: tuple[str, ...]) -> tuple:
    signature = []
    for name in files:
        try:
            st = os.stat(name)
            signature.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError as exc:
            signature.append((name, exc.errno))
    return tuple(signature)


class WebConfigSource:
    """The web configuration, read again whenever one of its files changes.

    A file that turns bad at run time fails closed: connections are refused (and the reason logged once)
    until it is fixed, as exporter-toolkit does. Turning TLS on or off needs a restart.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._settings = load_web_config(self.path)
        self._signature = _signature(self._settings.files)
        self._error: WebConfigError | None = None
        self.tls = self._settings.tls is not None

    def settings(self) -> WebSettings:
        """Raises WebConfigError while the file is unusable."""
        with self._lock:
            signature = _signature(self._settings.files)
            if signature == self._signature:
                if self._error is not None:
                    raise self._error
                return self._settings
            self._signature = signature
            try:
                settings = load_web_config(self.path)
                if (settings.tls is not None) != self.tls:
                    raise WebConfigError(f"{self.path}: turning TLS on or off needs a restart of the exporter")
            except WebConfigError as exc:
                self._error = exc
                raise
            self._error = None
            self._settings = settings
            self._signature = _signature(settings.files)
            return settings


# -----------------------------------------------------------------------------------------------------------
# Basic authentication and the rate limit


class BasicAuth:
    """Checks user and password against bcrypt hashes.

    bcrypt is slow on purpose (tens of milliseconds at cost 10), so results are remembered by a digest of
    user, hash and password (never the password itself), and hashes are computed one at a time so that a
    flood of bad passwords costs one core, not all of them.
    """

    def __init__(self, cache_size: int = AUTH_CACHE_SIZE) -> None:
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def check(self, users: dict[str, bytes], user: str, password: str) -> bool:
        hashed = users.get(user)
        known = hashed is not None
        hashed = hashed if known else UNKNOWN_USER_HASH
        digest = hashlib.sha256(b"\0".join([user.encode(), hashed, password.encode()])).digest()
        with self._cache_lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return self._cache[digest]
        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password.encode(), hashed) and known
            except ValueError:
                ok = False
        with self._cache_lock:
            self._cache[digest] = ok
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ok


class TokenBucket:
    """rate_limit: one request per interval on average, bursts of up to burst."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._updated = time.monotonic()
        self._limit: RateLimit | None = None

    def allow(self, limit: RateLimit | None) -> bool:
        if limit is None:
            return True
        with self._lock:
            now = time.monotonic()
            if limit != self._limit:
                self._limit, self._tokens, self._updated = limit, float(limit.burst), now
            rate = 1.0 / limit.interval_seconds
            self._tokens = min(float(max(limit.burst, 1)), self._tokens + (now - self._updated) * rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False
