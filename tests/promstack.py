"""Test support: a real Prometheus, a real Alertmanager and a webhook receiver, all on loopback.

Prometheus and Alertmanager are Debian's binaries (packages prometheus and prometheus-alertmanager). Each
runs as a child process on a free 127.0.0.1 port with its storage in the test's work directory and is
ended by its PID in stop(); a missing binary skips the test with the reason. Use them as context managers
(or call stop() in a finally) so that a failing test still ends them:

    with Prometheus.start(workdir, [exporter_address], rule_files=[rules]) as prometheus:
        prometheus.wait_for('sopsnix_store_up == 1')
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from serving import free_port

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
STARTUP_TIMEOUT = 30.0


def _binary(path: str, package: str) -> str:
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(Path(path).name)
    if found is None:
        pytest.skip(f"{path} not installed (Debian package {package}); run scripts/test")
    return found


def _host_port(target: str) -> str:
    """'127.0.0.1:9785' or 'http://127.0.0.1:9785' -> '127.0.0.1:9785'."""
    return urlsplit(target).netloc if "://" in target else target


class _Server:
    """A child process serving HTTP on loopback; ended by its PID."""

    name = "server"
    ready_path = "/-/ready"

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @classmethod
    def _launch(cls, cmd: list[str], url: str, log_path: Path):
        log = open(log_path, "w")
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        server = cls(process, url, log_path)
        try:
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not become ready on {self.url}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Prometheus(_Server):
    name = "prometheus"

    @classmethod
    def start(
        cls,
        workdir: Path,
        targets: Iterable[str],
        rule_files: Iterable[Path] = (),
        alertmanager_url: str | None = None,
        job: str = "sops-nix",
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
    ) -> Prometheus:
        """Scrape `targets` ('host:port' or URLs) as `job`, evaluate `rule_files`, send alerts to Alertmanager."""
        binary = _binary(PROMETHEUS, "prometheus")
        port = free_port()
        home = Path(workdir) / f"prometheus-{port}"
        home.mkdir(parents=True)
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_timeout": scrape_interval,
                    "static_configs": [{"targets": [_host_port(t) for t in targets]}],
                }
            ],
        }
        if alertmanager_url is not None:
            parts = urlsplit(alertmanager_url)
            config["alerting"] = {
                "alertmanagers": [
                    {
                        "scheme": parts.scheme or "http",
                        "path_prefix": parts.path or "/",
                        "static_configs": [{"targets": [parts.netloc]}],
                    }
                ]
            }
        config_path = home / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            # Short-lived test servers: resend firing alerts quickly so Alertmanager hears of them soon.
            "--rules.alert.resend-delay=1s",
        ]
        prometheus = cls._launch(cmd, f"http://127.0.0.1:{port}", home / "prometheus.log")
        prometheus.config_path = config_path
        return prometheus

    def load_rules(self, rule_files: Iterable[Path]) -> None:
        """Replace the rule files and reload the configuration; returns once every group is loaded.

        Useful when rules with shortened `for` durations must not see the first seconds after start-up,
        before service discovery hands Prometheus its targets (it does so at most every 5 seconds).
        """
        config = yaml.safe_load(self.config_path.read_text())
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        response = requests.post(f"{self.url}/-/reload", timeout=30)
        if response.status_code != 200:
            raise AssertionError(f"prometheus reload failed: {response.status_code} {response.text}")
        expected = {group["name"] for f in rule_files for group in yaml.safe_load(Path(f).read_text())["groups"]}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while {group["name"] for group in self.rules()} != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not load the rule groups {sorted(expected)}:\n{self.log_tail()}")
            time.sleep(0.1)

    def api(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the vector's samples as dicts {'metric': {...}, 'value': [ts, 'v']}."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]  # scalar or string

    def wait_for(
        self, expr: str, predicate: Callable[[list[dict]], bool] = lambda result: bool(result), timeout: float = 60
    ) -> list[dict]:
        """Poll `expr` until predicate(result) holds; returns that result, or fails with the last one seen."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"prometheus: {expr!r} did not satisfy the condition within {timeout}s; last result: {result}\n"
                    f"targets: {self.targets()}\nlog:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def alerts(self) -> list[dict]:
        """Pending and firing alerts, as /api/v1/alerts reports them."""
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def targets(self) -> list[dict]:
        return [
            {"scrapeUrl": t.get("scrapeUrl"), "health": t.get("health"), "lastError": t.get("lastError")}
            for t in self.api("targets")["activeTargets"]
        ]


class Alertmanager(_Server):
    name = "alertmanager"

    @classmethod
    def start(cls, workdir: Path, config_path: Path) -> Alertmanager:
        binary = _binary(ALERTMANAGER, "prometheus-alertmanager")
        port = free_port()
        home = Path(workdir) / f"alertmanager-{port}"
        home.mkdir(parents=True)
        cmd = [
            binary,
            f"--config.file={Path(config_path).resolve()}",
            f"--storage.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip: a single instance, and nothing beyond loopback
        ]
        return cls._launch(cmd, f"http://127.0.0.1:{port}", home / "alertmanager.log")

    def alerts(self, **filters: str) -> list[dict]:
        """Alerts Alertmanager holds (API v2); filters as in the API, e.g. filter='alertname="X"'."""
        response = requests.get(f"{self.url}/api/v2/alerts", params=filters, timeout=10)
        response.raise_for_status()
        return response.json()


class WebhookReceiver:
    """Records what Alertmanager POSTs to a webhook receiver; runs an HTTP server thread on loopback.

    Every request is kept as (path, payload); payloads of one path form one receiver, so a single
    WebhookReceiver can stand in for several receivers: url_for("pager") and url_for("ticket").
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {"unparsable": raw.decode(errors="replace")}
                with receiver._lock:
                    receiver.requests.append((self.path, payload))
                    receiver._lock.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def payloads(self, name: str | None = None) -> list[dict]:
        with self._lock:
            return [p for path, p in self.requests if name is None or path == f"/{name}"]

    def alerts(self, name: str | None = None) -> list[dict]:
        """Every alert of every payload received (at `name`, or anywhere), in arrival order."""
        return [alert for payload in self.payloads(name) for alert in payload.get("alerts", [])]

    def wait_for(
        self, predicate: Callable[[dict], bool], name: str | None = None, timeout: float = 60
    ) -> dict:
        """The first alert received (at `name`) for which predicate(alert) holds; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for path, payload in self.requests:
                    if name is not None and path != f"/{name}":
                        continue
                    for alert in payload.get("alerts", []):
                        if predicate(alert):
                            return alert
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"webhook: no matching alert within {timeout}s; received: {json.dumps(self.requests)[:4000]}"
                    )
                self._lock.wait(min(remaining, 0.5))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
