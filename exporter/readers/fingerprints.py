"""The content fingerprints `sops-nix-exporter fingerprint` writes (exporter/fingerprint.py), read by the
exporter, which never opens a file in a store: whether a reader's secrets differ from the host's now.

A fingerprint file never changes once written (a generation changed in place gets a new one), so each is
parsed once and kept while its name, mtime and size stay the same. A scrape lists each store's fingerprint
directory once and reads only the fingerprints it compares: the current generation's, the one it replaced,
and those readers hold.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from dataclasses import dataclass

from sops_nix_exporter.stores.scan import Generation, StoreScan, generation_number

FORMAT_VERSION = 1
STATUS_NAME = "status.json"  # the last run's time and error count, written by `fingerprint`
SETTLE_NS = 2_000_000_000  # as exporter/stores/cache.py: a directory changed this recently may change again unseen


def store_directory(fingerprint_dir: str, mountpoint: str) -> str:
    """FINGERPRINT_DIR/STORE: the store's mount point, escaped into one file name."""
    return os.path.join(fingerprint_dir, urllib.parse.quote(mountpoint, safe=""))


@dataclass(frozen=True, slots=True)
class Fingerprint:
    generation: int
    device: int
    inode: int
    files: dict[str, str]  # relative path -> keyed digest; held by the exporter alone, never published


def differing(old: Fingerprint, new: Fingerprint, subtree: str = "") -> int:
    """Files below subtree ("" for the whole generation, "app" for app/) that differ, were added or removed."""
    prefix = subtree.strip("/") + "/" if subtree.strip("/") else ""
    names = {n for n in old.files if n.startswith(prefix)} | {n for n in new.files if n.startswith(prefix)}
    return sum(1 for name in names if old.files.get(name) != new.files.get(name))


class StoreFingerprints:
    """One store's fingerprints as listed by one scrape."""

    def __init__(self, reader: FingerprintReader, directory: str, numbers: set[int], store: StoreScan) -> None:
        self._reader = reader
        self._directory = directory
        self.numbers = numbers
        self._store = store

    @property
    def fingerprinted(self) -> int:
        """Generations of the store that have a fingerprint (by number: identities are checked when compared)."""
        return sum(1 for g in self._store.generations if g.number in self.numbers)

    def of(self, number: int) -> Fingerprint | None:
        """The fingerprint of generation `number` as the store has it now; None when there is none, or it
        describes another directory of that number (a remount) than the scan found."""
        if number not in self.numbers:
            return None
        found = self._reader.read(os.path.join(self._directory, f"{number}.json"))
        if found is None or found.generation != number:
            return None
        generation: Generation | None = self._store.by_number(number)
        if generation is not None and (generation.device, generation.inode) != (found.device, found.inode):
            return None
        return found

    def replaced(self) -> Fingerprint | None:
        """The fingerprint of the generation the current one replaced (the newest below it)."""
        current = self._store.current
        if current is None:
            return None
        below = [n for n in self.numbers if n < current.number]
        return self.of(max(below)) if below else None


class FingerprintReader:
    """Kept across scrapes: parsed fingerprints by path, while the file stays the same."""

    def __init__(self, fingerprint_dir: str) -> None:
        self.fingerprint_dir = fingerprint_dir
        self._parsed: dict[str, tuple[tuple[int, int, int], Fingerprint | None]] = {}
        # A store's listing, kept while its directory's mtime stays what it was, and only once that mtime had
        # settled before the listing was taken (timestamps are coarse: a change within the same tick as a
        # listing would otherwise go unseen).
        self._listed: dict[str, tuple[tuple[int, int], set[int]]] = {}
        self.errors = 0  # fingerprint files that could not be read or parsed, last scrape

    def store(self, store: StoreScan) -> StoreFingerprints | None:
        """None when the store has no fingerprint directory (fingerprints not enabled, or not run yet)."""
        directory = store_directory(self.fingerprint_dir, store.mountpoint)
        try:
            st = os.stat(directory)
            stamp = (st.st_ino, st.st_mtime_ns)
            cached = self._listed.get(directory)
            if cached is not None and cached[0] == stamp:
                numbers = cached[1]
            else:
                listed_at = time.time_ns()
                names = os.listdir(directory)
                numbers = set()
                for name in names:
                    number = generation_number(name.removesuffix(".json")) if name.endswith(".json") else None
                    if number is not None:
                        numbers.add(number)
                if st.st_mtime_ns < listed_at - SETTLE_NS:
                    self._listed[directory] = (stamp, numbers)
                else:
                    self._listed.pop(directory, None)
        except OSError:
            self._listed.pop(directory, None)
            return None
        if cached is None or cached[1] is not numbers:  # listed afresh: drop what is no longer there
            prefix = directory + "/"
            for path in [p for p in self._parsed if p.startswith(prefix)]:
                number = generation_number(path[len(prefix) :].removesuffix(".json"))
                if number not in numbers:
                    del self._parsed[path]  # nothing outlives the fingerprint it came from
        return StoreFingerprints(self, directory, numbers, store)

    def read(self, path: str) -> Fingerprint | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found = None
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
            if document.get("version") == FORMAT_VERSION:
                identity = document["identity"]
                found = Fingerprint(int(document["generation"]), int(identity[0]), int(identity[1]),
                                    {str(k): str(v) for k, v in document["files"].items()})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            self.errors += 1
        self._parsed[path] = (stamp, found)
        return found

    def last_run(self) -> tuple[float, int] | None:
        """(when the last `fingerprint` run finished, how many generations or stores it could not fingerprint),
        from FINGERPRINT_DIR/status.json; None before any run."""
        try:
            with open(os.path.join(self.fingerprint_dir, STATUS_NAME), encoding="utf-8") as f:
                status = json.load(f)
            return float(status["finished"]), int(status["errors"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
