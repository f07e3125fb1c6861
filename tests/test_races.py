"""Issue 8, races: one thread switches and prunes generations as fast as it can for 30 seconds, the way
sops-nix does (write N+1, rename the symlink over, remove what keepGenerations lets go), while scrapes of
the real exporter process run back to back. None may fail, every exposition must be valid, and no figure
may be impossible against what the switcher did and when."""

from __future__ import annotations

import bisect
import subprocess
import threading
import time
from dataclasses import dataclass, field

import requests

from scrape import samples, value
from tools import require_tool

SWITCH_SECONDS = 30
KEEP_GENERATIONS = 2
FILES_PER_GENERATION = 6
SECRETS = {
    "db-password": "x" * 40,
    "api-token": "y" * 300,
    "tls/key.pem": "k" * 1704,
    "rendered/app.env": "A=1\n" * 700,
    "rendered/nested/deep.conf": "z" * 5000,
    "rendered/nested/more.conf": "w" * 9000,
}


@dataclass
class Links:
    """When each generation became current, by the test's clock: (before the rename, after it)."""

    numbers: list[int] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    def add(self, number: int, before: float, after: float) -> None:
        self.numbers.append(number)
        self.before.append(before)
        self.after.append(after)

    def possibly_current(self, start: float, end: float) -> set[int]:
        """Every generation that may have been current at some moment in [start, end]."""
        possible = set()
        for i, number in enumerate(self.numbers):
            became = self.before[i]
            ended = self.after[i + 1] if i + 1 < len(self.numbers) else float("inf")
            if became <= end and ended >= start:
                possible.add(number)
        return possible

    def linked_by(self, moment: float) -> int:
        """The highest generation that was surely linked by then."""
        index = bisect.bisect_right(self.after, moment)
        return self.numbers[index - 1] if index else 0


def test_switch_and_prune_while_scraping(make_store, pinners, scratch, serve):
    promtool = require_tool("promtool", "prometheus")
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    links = Links()
    before = time.monotonic()
    store.write_generation(1, SECRETS)
    store.link(1)
    links.add(1, before, time.monotonic())
    pinners(source=store.symlink, mode="namespace", vm="web", state_dir=state_dir)
    mp = str(store.mountpoint)
    served = serve({"stores": [{"mountpoint": mp, "symlink": str(store.symlink), "keep_generations": KEEP_GENERATIONS}],
                    "microvm": {"state_dir": str(state_dir)}})  # fmt: skip

    stop = threading.Event()
    most_at_once = [1]
    failures: list[BaseException] = []

    def switcher() -> None:
        try:
            number = 1
            while not stop.is_set():
                number += 1
                store.write_generation(number, SECRETS)
                most_at_once[0] = max(most_at_once[0], len(store.generations()))
                started = time.monotonic()
                store.link(number)
                links.add(number, started, time.monotonic())
                store.prune(KEEP_GENERATIONS)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    scrapes: list[tuple[float, float, int, str]] = []

    def scraper() -> None:
        session = requests.Session()
        try:
            while not stop.is_set():
                start = time.monotonic()
                response = session.get(served.url + "/metrics", timeout=30)
                scrapes.append((start, time.monotonic(), response.status_code, response.text))
        except BaseException as exc:
            failures.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=switcher), threading.Thread(target=scraper), threading.Thread(target=scraper)]
    for thread in threads:
        thread.start()
    time.sleep(SWITCH_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    switches = len(links.numbers) - 1
    assert switches > 200, f"only {switches} switches in {SWITCH_SECONDS} s"
    assert len(scrapes) > 50, f"only {len(scrapes)} scrapes in {SWITCH_SECONDS} s"
    assert most_at_once[0] == KEEP_GENERATIONS + 1

    impossible = []
    previous_current, previous_end = 0, 0.0
    ordered = sorted(scrapes, key=lambda s: s[0])
    for start, end, status, text in ordered:
        # Concurrent scrapes share the collection in flight (exporter/collector/frame.py): this one's may have
        # begun with a scrape that was already running when this one was sent.
        began = min([start] + [other[0] for other in ordered if other[0] <= start <= other[1]])
        assert status == 200, text
        found = samples(text)  # parses, once: the checks below look values up

        figures = {
            name: value(found, f"sopsnix_{name}", mountpoint=mp)
            for name in ("store_up", "generations", "current_generation", "current_generation_files",
                         "oldest_generation", "pending_generations", "symlink_ok", "generations_bytes",
                         "current_generation_bytes")
        }  # fmt: skip
        problems = []
        if value(found, "sopsnix_scrape_collector_success", collector="stores") != 1:
            problems.append("stores collector failed")
        if value(found, "sopsnix_scrape_collector_success", collector="shares") != 1:
            problems.append("shares collector failed")
        if figures["store_up"] != 1:
            problems.append("store down")
        if not 1 <= (figures["generations"] or 0) <= most_at_once[0]:
            problems.append(f"{figures['generations']} generations; never more than {most_at_once[0]} existed")
        # sops-nix renames the symlink over the old one: it is never missing, so there is always a current one.
        if figures["symlink_ok"] != 1 or figures["current_generation"] is None:
            state = [k for k in found if k[0] == "sopsnix_symlink_info"]
            problems.append(f"no current generation (symlink {state})")
        else:
            current = int(figures["current_generation"])
            if current not in links.possibly_current(began, end):
                problems.append(f"current generation {current} was not current during the scrape")
            if current < previous_current and began > previous_end:
                problems.append(f"current generation went back from {previous_current} to {current}")
            if figures["current_generation_files"] != FILES_PER_GENERATION:
                problems.append(f"current generation has {figures['current_generation_files']} files")
            if (figures["oldest_generation"] or 0) > current:
                problems.append(f"oldest {figures['oldest_generation']} above current {current}")
            if (figures["current_generation_bytes"] or 0) > (figures["generations_bytes"] or 0):
                problems.append("the current generation holds more than all of them")
            if figures["pending_generations"] not in (0, 1):
                problems.append(f"{figures['pending_generations']} pending generations")
            previous_current, previous_end = current, end
        if value(found, "sopsnix_store_scan_errors", mountpoint=mp, reason="error") != 0:
            problems.append("scan errors")
        # The VM pinned generation 1, which the first prunes deleted under it.
        if value(found, "sopsnix_vm_serving_generation", vm="web", share="secrets", mountpoint=mp) != 1:
            problems.append("the VM's served generation is not 1")
        if problems:
            impossible.append((round(start - links.before[0], 3), problems))
    assert impossible == [], f"{len(impossible)} of {len(scrapes)} scrapes: {impossible[:10]}"

    # promtool on every exposition of a new shape (series and help lines, values left out) and on every
    # tenth, for the values: a thousand promtool runs would take longer than the race itself.
    shapes: set[str] = set()
    invalid = []
    for index, (_, _, _, text) in enumerate(ordered):
        shape = "\n".join(line.rsplit(" ", 1)[0] for line in text.splitlines())
        if shape in shapes and index % 10:
            continue
        shapes.add(shape)
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        if result.returncode != 0:
            invalid.append(result.stdout + result.stderr)
    assert invalid == []
    assert served.process.poll() is None
