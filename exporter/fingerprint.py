"""`sops-nix-exporter fingerprint`: the one command that reads secrets, run as root in a oneshot unit of its own,
without network. `serve`, `check` and `textfile` never open a file in a store; they read what this writes.

For every generation of every configured store that the symlink has pointed at (numbered at or below the
current one: a pending generation may still be being written) and that has no fingerprint yet, it writes one
file, FINGERPRINT_DIR/STORE/N.json: for each regular file below the generation, its path relative to the
generation and an HMAC-SHA256 of its content, and the generation's identity (the device, inode, mtime and
ctime of each of its directories, as the exporter's cache keeps them), so that a number reused after a remount,
or a generation changed in place, is fingerprinted anew. The key is FINGERPRINT_DIR/key, 32 random bytes made
at the first run, mode 0600: never readable by the exporter, so a digest tells nothing about a value. Each file
is written atomically, mode 0640, in the group of FINGERPRINT_DIR (the exporter's). Fingerprints of
generations that no longer exist are removed, but for the newest one below the current generation: the
exporter compares the current generation with the one it replaced.

Nothing it prints names a secret: errors name the store and the generation number only.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field

from sops_nix_exporter.config import Config
from sops_nix_exporter.readers.fingerprints import FORMAT_VERSION, STATUS_NAME, store_directory
from sops_nix_exporter.stores.scan import generation_number
from sops_nix_exporter.stores.walk import walk

log = logging.getLogger(__name__)

KEY_NAME = "key"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


@dataclass
class RunResult:
    written: int = 0
    kept: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)  # store and generation number, never a file's name


def _key(fingerprint_dir: str) -> bytes:
    """The HMAC key, made at the first run; the directory is made 0750 if it is missing."""
    os.makedirs(fingerprint_dir, mode=0o750, exist_ok=True)
    path = os.path.join(fingerprint_dir, KEY_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise PermissionError(errno.EPERM, f"{path} must be owned by the running user and mode 0600")
            key = os.read(fd, 64)
        finally:
            os.close(fd)
        if len(key) != 32:
            raise ValueError(f"{path} does not hold a 32-byte key")
        return key
    try:
        key = os.urandom(32)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _digest_file(key: bytes, path: str, device: int) -> str:
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_dev != device:
            raise OSError(errno.EINVAL, "not a regular file of the store")
        mac = hmac.new(key, digestmod=hashlib.sha256)
        while chunk := os.read(fd, 1 << 16):
            mac.update(chunk)
        return mac.hexdigest()
    finally:
        os.close(fd)


def fingerprint_generation(key: bytes, path: str, device: int) -> tuple[list[int], dict[str, str]]:
    """(identity, relative path -> keyed digest) of one generation. Never follows a symlink nor leaves the
    store's filesystem (the walk's rules); raises OSError when part of it cannot be read."""
    errors: dict[str, int] = {}
    tally = walk(path, device, errors)
    if errors or not tally.complete:
        raise OSError(errno.EIO, f"part of the generation could not be listed ({', '.join(sorted(errors))})")
    files: dict[str, str] = {}
    for directory in ("", *tally.relatives):
        base = os.path.join(path, directory) if directory else path
        with os.scandir(base) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    relative = f"{directory}/{entry.name}" if directory else entry.name
                    files[relative] = _digest_file(key, entry.path, device)
    return list(tally.signature), files


def _write_atomically(directory: str, name: str, document: dict, gid: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, sort_keys=True)
            f.flush()
            os.fchown(f.fileno(), -1, gid)
            os.fchmod(f.fileno(), 0o640)
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _existing(directory: str) -> dict[int, dict]:
    found = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        number = generation_number(name.removesuffix(".json")) if name.endswith(".json") else None
        if number is None:
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                found[number] = json.load(f)
        except (OSError, ValueError):
            found[number] = {}  # unreadable or half-written by hand: written anew
    return found


def run(config: Config) -> RunResult:
    """Fingerprint what is missing, in every configured store; remove what no longer has a generation."""
    result = RunResult()
    fingerprint_dir = config.fingerprint_dir
    key = _key(fingerprint_dir)
    gid = os.stat(fingerprint_dir).st_gid
    for store in config.stores:
        try:
            _run_store(store.mountpoint, store.symlink, fingerprint_dir, key, gid, result)
        except OSError as exc:
            result.errors.append(f"store {store.mountpoint}: {exc.strerror or exc}")
    _write_atomically(fingerprint_dir, STATUS_NAME, {
        "finished": time.time(), "written": result.written, "removed": result.removed, "errors": len(result.errors),
    }, gid)  # fmt: skip
    return result


def _run_store(mountpoint: str, symlink: str, fingerprint_dir: str, key: bytes, gid: int, result: RunResult) -> None:
    try:
        top = os.stat(mountpoint)
    except FileNotFoundError:
        return  # no store of this kind on this host
    try:
        linked = os.stat(symlink)
    except FileNotFoundError:
        linked = None
    generations: dict[int, os.stat_result] = {}
    with os.scandir(mountpoint) as entries:
        for entry in entries:
            number = generation_number(entry.name)
            if number is not None and entry.is_dir(follow_symlinks=False):
                generations[number] = entry.stat(follow_symlinks=False)
    current = next((n for n, st in generations.items()
                    if linked is not None and (st.st_dev, st.st_ino) == (linked.st_dev, linked.st_ino)), None)  # fmt: skip
    directory = store_directory(fingerprint_dir, mountpoint)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.chown(directory, -1, gid)
    existing = _existing(directory)
    if current is not None:
        for number in sorted(n for n in generations if n <= current):
            st = generations[number]
            known = existing.get(number, {})
            identity = known.get("identity") or []
            if identity[:2] == [st.st_dev, st.st_ino] and known.get("version") == FORMAT_VERSION:
                # Cheap check first; a generation changed in place has new directory times.
                try:
                    signature = list(walk(os.path.join(mountpoint, str(number)), top.st_dev, {}).signature)
                except Exception:  # noqa: BLE001 - vanished meanwhile: nothing to keep
                    signature = []
                if signature == identity:
                    result.kept += 1
                    continue
            try:
                identity, files = fingerprint_generation(key, os.path.join(mountpoint, str(number)), top.st_dev)
            except Exception as exc:  # noqa: BLE001 - one generation must not stop the others
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                result.errors.append(f"store {mountpoint} generation {number}: {reason}")
                continue
            _write_atomically(directory, f"{number}.json", {
                "version": FORMAT_VERSION, "generation": number, "identity": identity, "files": files,
            }, gid)  # fmt: skip
            result.written += 1
    # The newest fingerprint below the current generation stays even once its generation is gone: the one
    # the current replaced, for sopsnix_current_generation_changed_files.
    below = [n for n in existing if current is not None and n < current]
    replaced = max(below) if below else None
    for number in existing:
        if number not in generations and number != replaced:
            try:
                os.unlink(os.path.join(directory, f"{number}.json"))
                result.removed += 1
            except FileNotFoundError:
                pass
