"""The HTTP server, as a real process on loopback: /metrics (text and OpenMetrics), /healthz, the landing
page, 404 anywhere else, HEAD, concurrent scrapes, logging each problem once, and a clean shutdown."""

from __future__ import annotations

import json
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from sops_nix_exporter import __version__

from scrape import samples, series, value
from serving import ROOT, free_port, write_config
from sopsnix import Secrets, config_data, du_figures, sops_layout, store_config

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def served_store(make_store, serve):
    """A sops-nix store and an exporter serving it; returns (store, secrets, exporter). The HTTP side does
    not depend on the filesystem: ramfs only (test_stores.py covers both)."""
    store = make_store("ramfs")
    secrets = Secrets()
    sops_layout(store, secrets)
    exporter = serve(config_data(store_config(store, keep_generations=2)), "--log.level=debug")
    return store, secrets, exporter


def test_metrics(served_store, promtool_check):
    store, secrets, exporter = served_store
    response = requests.get(exporter.url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == TEXT_FORMAT
    assert int(response.headers["Content-Length"]) == len(response.content)
    text = response.text
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 4
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == sum(
        du_figures(store.generation_path(n))[1] for n in (3, 4, 5)
    )
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    assert series(text, "sopsnix_exporter_build_info") == [
        {"version": __version__, "python_version": platform.python_version()}  # the same interpreter
    ]
    # The serving process describes itself too (client_python's process and platform collectors).
    names = {name for name, _ in samples(text)}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names
    assert secrets.leaked(text) == []


def test_metrics_as_openmetrics(served_store):
    store, secrets, exporter = served_store
    response = requests.get(
        exporter.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(OPENMETRICS)
    assert response.text.endswith("# EOF\n")
    found = {}
    for family in openmetrics_families(response.text):  # raises on anything that is not valid OpenMetrics
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    mp = str(store.mountpoint)
    assert found[("sopsnix_generations", (("mountpoint", mp),))] == 3
    assert found[("sopsnix_pending_generations", (("mountpoint", mp),))] == 1
    assert secrets.leaked(response.text) == []


def test_healthz_and_landing_page(served_store):
    _, _, exporter = served_store
    health = requests.get(exporter.url + "/healthz", timeout=10)
    assert (health.status_code, health.text) == (200, "ok\n")
    assert health.headers["Content-Type"].startswith("text/plain")
    landing = requests.get(exporter.url + "/", timeout=10)
    assert landing.status_code == 200
    assert landing.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<a href="/metrics">' in landing.text and '<a href="/healthz">' in landing.text
    assert __version__ in landing.text
    query = requests.get(exporter.url + "/metrics?collect[]=stores", timeout=30)
    assert query.status_code == 200 and "sopsnix_store_up" in query.text


@pytest.mark.parametrize("path", ["/metric", "/metrics/", "/metricsx", "/healthz/x", "/index.html", "/../etc/passwd"])
def test_not_found(served_store, path):
    _, _, exporter = served_store
    response = requests.get(exporter.url + path, timeout=10)
    assert response.status_code == 404
    assert response.text == "not found\n"


def test_head(served_store):
    _, _, exporter = served_store
    with requests.Session() as session:  # one kept-alive connection: HEAD must not leave a body on it
        for path, status, content_type in [
            ("/metrics", 200, TEXT_FORMAT),
            ("/healthz", 200, "text/plain; charset=utf-8"),
            ("/", 200, "text/html; charset=utf-8"),
            ("/nowhere", 404, "text/plain; charset=utf-8"),
        ]:
            response = session.head(exporter.url + path, timeout=30)
            assert response.status_code == status, path
            assert response.headers["Content-Type"] == content_type, path
            assert response.content == b"", path
            assert int(response.headers["Content-Length"]) > 0, path
        after = session.get(exporter.url + "/healthz", timeout=10)
        assert (after.status_code, after.text) == (200, "ok\n")


def test_concurrent_scrapes_and_a_stalled_client(served_store, promtool_check):
    """A client that sends half a request holds only its own thread; concurrent scrapes all succeed."""
    store, _, exporter = served_store
    port = int(exporter.url.rsplit(":", 1)[1])
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        results: list[str] = []
        errors: list[BaseException] = []

        def scrape() -> None:
            try:
                response = requests.get(exporter.url + "/metrics", timeout=30)
                response.raise_for_status()
                results.append(response.text)
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=scrape) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert len(results) == 6
        for text in results:
            assert value(text, "sopsnix_generations", mountpoint=str(store.mountpoint)) == 3
        promtool_check(results[-1])
    finally:
        stalled.close()


def test_every_scrape_reads_afresh(store, serve):
    secrets = Secrets()
    store.switch({secrets.name(): secrets.content(100)}, keep_generations=1)
    exporter = serve(config_data(store_config(store, keep_generations=1)))
    mp = str(store.mountpoint)
    assert value(exporter.metrics(), "sopsnix_current_generation", mountpoint=mp) == 1
    store.switch({secrets.name(): secrets.content(9000)}, keep_generations=1)
    text = exporter.metrics()
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 2
    assert value(text, "sopsnix_oldest_generation", mountpoint=mp) == 2
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == du_figures(store.mountpoint)[1] == 12288


def test_problems_are_logged_once_and_when_resolved(store, serve):
    secrets = Secrets()
    for number in (1, 2):
        store.write_generation(number, {secrets.name(): secrets.content(500)})
    store.symlink.symlink_to(store.generation_path(3))  # dangling, with generations present
    exporter = serve(config_data(store_config(store)), "--log.format=json", "--log.level=debug")
    for _ in range(3):
        assert value(exporter.metrics(), "sopsnix_symlink_ok", mountpoint=str(store.mountpoint)) == 0
    store.link(2)
    for _ in range(2):
        assert value(exporter.metrics(), "sopsnix_symlink_ok", mountpoint=str(store.mountpoint)) == 1
    exporter.stop()
    assert exporter.process.returncode == 0
    records = [json.loads(line) for line in exporter.log().splitlines()]
    problem = f"store {store.mountpoint}: symlink {store.symlink} is dangling"
    assert [r["level"] for r in records if r["msg"] == problem] == ["error"]
    assert [r["level"] for r in records if r["msg"] == "resolved: " + problem] == ["info"]
    listening = [r for r in records if r["msg"] == "listening"]
    assert len(listening) == 1 and listening[0]["address"] == exporter.url.removeprefix("http://")
    assert records[-1]["msg"] == "shutting down"
    assert secrets.leaked(exporter.log()) == []


def test_sigterm_stops_cleanly(served_store):
    store, secrets, exporter = served_store
    exporter.metrics()
    exporter.process.send_signal(signal.SIGTERM)
    assert exporter.process.wait(timeout=15) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(exporter.url + "/healthz", timeout=2)
    assert "shutting down" in exporter.log()
    assert secrets.leaked(exporter.log()) == []  # at --log.level=debug, requests included


def _serve(scratch, *args: str) -> subprocess.CompletedProcess:
    config = write_config(scratch, config_data())
    return subprocess.run(
        [sys.executable, "-m", "sops_nix_exporter", "serve", f"--config.file={config}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_listen_address_exits_2(scratch, address):
    result = _serve(scratch, f"--web.listen-address={address}")
    assert result.returncode == 2, result.stderr
    assert f"--web.listen-address {address!r}" in result.stderr


def test_port_in_use_exits_1(scratch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(scratch, f"--web.listen-address=127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_ipv6_loopback(scratch):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc.strerror}")
    port = free_port()
    config = write_config(scratch, config_data())
    log = open(scratch / "exporter.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "sops_nix_exporter", f"--config.file={config}", f"--web.listen-address=[::1]:{port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = requests.get(f"http://[::1]:{port}/healthz", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None, (scratch / "exporter.log").read_text()
                assert time.monotonic() < deadline, "no answer on [::1]"
                time.sleep(0.1)
        assert (response.status_code, response.text) == (200, "ok\n")
        with pytest.raises(requests.ConnectionError):  # bound to ::1 only, not to IPv4
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0
