"""Walking one generation: lstat every file below it, note every directory. Also a helper process's main.

This module imports nothing outside the standard library, so that a helper process can run it from a bare
interpreter (`python -I -S`) in a few milliseconds: a first scan of thousands of generations is shared
between the exporter and helper processes, one per usable CPU (stores/cache.py, CachingMeasurer.prefetch).
Walking is system calls and Python bookkeeping in equal parts; threads would serialise on the interpreter
lock, processes do not.

Nothing here opens a file: directories are opened to be listed (O_NOFOLLOW), files are only lstat()ed. No
name found below a generation is ever written anywhere but the returned directory paths (`rendered`), which
the exporter keeps to itself.
"""

from __future__ import annotations

import errno
import marshal
import os
import signal
import sys
import time
from collections import namedtuple
from collections.abc import Callable

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_TYPE, _REGULAR, _DIRECTORY = 0o170000, 0o100000, 0o040000  # S_IFMT, S_IFREG, S_IFDIR


class GenerationVanished(Exception):
    """The generation directory was removed while it was being measured (a prune during the scan)."""


def error_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission_denied"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        return "vanished"
    return "error"


# What walk() found: the regular files, their st_blocks and st_size summed, whether everything could be read,
# the relative paths of the directories below (walk order), and the signature (see walk).
Tally = namedtuple("Tally", "files blocks size complete relatives signature")


def walk(path: str, device: int, errors: dict[str, int], opening: Callable[[str], None] | None = None) -> Tally:
    """Sum the regular files below path, never following symlinks nor leaving the filesystem, and note every
    directory on the way.

    Returns the file count, the sums of st_blocks and st_size, whether everything could be read, the paths
    of the directories below path (relative, walk order) and the signature: (st_dev, st_ino, st_mtime_ns,
    st_ctime_ns) of path itself followed by that of each of those directories, flattened, each taken before
    the directory was listed. Directories on another filesystem (something mounted inside a generation) are
    noted but not entered. An entry that vanished between the listing and its lstat is not counted (it no
    longer costs memory); any other failure is counted in errors by reason and makes the tally incomplete.
    Raises GenerationVanished when path itself disappears. opening, if given, is called with the path of
    each directory to be entered, before it is opened.
    """
    files = blocks = size = 0
    complete = True
    relatives: list[str] = []
    signature: list[int] = []

    def failed(exc: OSError) -> None:
        nonlocal complete
        reason = error_reason(exc)
        if reason != "vanished":
            errors[reason] = errors.get(reason, 0) + 1
            complete = False

    try:
        if opening is not None:
            opening(path)
        root_fd = os.open(path, _DIRECTORY_FLAGS)
    except OSError as exc:
        if not os.path.lexists(path):
            raise GenerationVanished(path) from None
        failed(exc)
        return 0, 0, 0, complete, relatives, ()
    try:
        root = os.fstat(root_fd)
    except OSError as exc:
        os.close(root_fd)
        failed(exc)
        return 0, 0, 0, False, relatives, ()
    signature.extend((root.st_dev, root.st_ino, root.st_mtime_ns, root.st_ctime_ns))

    lstat, listdir, close = os.lstat, os.listdir, os.close
    file_type, regular, directory = _FILE_TYPE, _REGULAR, _DIRECTORY
    pending = [("", root_fd)]
    try:
        while pending:
            prefix, directory_fd = pending.pop()
            try:
                for name in listdir(directory_fd):
                    try:
                        st = lstat(name, dir_fd=directory_fd)
                    except OSError as exc:
                        failed(exc)
                        continue
                    kind = st.st_mode & file_type  # S_ISREG and S_ISDIR without a call each: once per file
                    if kind == regular:
                        files += 1
                        blocks += st.st_blocks
                        size += st.st_size
                    elif kind == directory:
                        relative = sys.intern(prefix + name)
                        relatives.append(relative)
                        signature.extend((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
                        if st.st_dev != device:
                            continue  # another filesystem mounted here: not part of the generation's cost
                        try:
                            # By its full path, not relative to directory_fd: a trace of the exporter then names
                            # every directory it opens (tests/test_stores.py checks that only directories are).
                            if opening is not None:
                                opening(path + "/" + relative)
                            pending.append((relative + "/", os.open(path + "/" + relative, _DIRECTORY_FLAGS)))
                        except OSError as exc:
                            failed(exc)
            except OSError as exc:  # the listing itself
                failed(exc)
            finally:
                close(directory_fd)
    finally:
        for _, directory_fd in pending:  # left over only when something unexpected ended the walk
            close(directory_fd)
    return Tally(files, blocks, size, complete, relatives, tuple(signature))


# --- a helper process ---------------------------------------------------------------------------------------

# What the exporter runs: a bare interpreter (-I: no environment, no user site; -S: no site packages) given
# this file's path (argv[1]). It loads this file's folder as a package of its own and this module from it, by
# path: no line names the installed package, whatever its name, and stores/__init__.py imports nothing.
HELPER_PATH = os.path.abspath(__file__)
HELPER_CODE = (
    "import sys, importlib, importlib.util as u, os.path as p; d = p.dirname(sys.argv[1]); "
    "s = u.spec_from_file_location('stores', p.join(d, '__init__.py'), submodule_search_locations=[d]); "
    "m = u.module_from_spec(s); sys.modules['stores'] = m; s.loader.exec_module(m); "
    "importlib.import_module('stores.walk').serve_helper()"
)

WALKED, VANISHED = 0, 1

# One generation walked for the exporter: status (WALKED, VANISHED), when the walk began (time_ns, before any
# stat), the Tally's fields, the errors by reason, the inotify watches placed and why watching stopped (None
# if it did not). A helper sends it as a plain tuple (marshal takes no subclass): Walk(*received) on arrival.
Walk = namedtuple(
    "Walk", "status started_ns files blocks size complete errors relatives signature watches stopped"
)


def walk_for_exporter(
    path: str, device: int, place_watch: Callable[[str], int] | None, watch_cap: int, limit_reason: str
) -> Walk:
    """Walk one generation as CachingMeasurer does, placing a watch before each directory is listed."""
    started_ns = time.time_ns()  # before any stat the walk takes
    errors: dict[str, int] = {}
    added: list[int] = []
    stopped: list[str] = []

    def opening(directory: str) -> None:
        if stopped:
            return
        if len(added) >= watch_cap:
            stopped.append(limit_reason)
            return
        try:
            added.append(place_watch(directory))
        except OSError as exc:  # ENOSPC: fs.inotify.max_user_watches; EACCES
            stopped.append(f"inotify_add_watch: {errno.errorcode.get(exc.errno, exc.errno)}")

    try:
        files, blocks, size, complete, relatives, signature = walk(
            path, device, errors, opening if place_watch is not None else None
        )
    except GenerationVanished:
        return Walk(VANISHED, started_ns, 0, 0, 0, False, errors, [], (), added, None)
    why_stopped = stopped[0] if stopped else None
    return Walk(WALKED, started_ns, files, blocks, size, complete, errors, relatives, signature, added, why_stopped)


def serve_helper() -> None:
    """A helper's main: read one request from stdin, walk, write the results to stdout, exit.

    The request (marshal): the directory listing the generations, [(name, device), ...], the inotify
    descriptor inherited from the exporter (-1: none), the event mask, how many watches it may place, and
    the reason to report when they run out. The answer (marshal): one Walk, as a plain tuple, per name, in
    order. Anything unexpected ends the helper with status 1 and nothing on stdout or stderr, so that no
    traceback can carry a name found in a generation anywhere: the exporter then walks those generations
    itself.
    """
    try:
        # The exporter blocks SIGTERM and SIGINT in its threads, and a new process inherits the mask: a helper
        # must still end with the service when systemd stops it.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        group, generations, inotify_fd, mask, watch_cap, limit_reason = marshal.load(sys.stdin.buffer)
        place_watch = None
        if inotify_fd >= 0 and watch_cap > 0:
            from . import inotify  # only when watching: ctypes costs a helper a few milliseconds

            place_watch = inotify.watcher(inotify_fd, mask)
        results = []
        for name, device in generations:
            result = walk_for_exporter(group + "/" + name, device, place_watch, watch_cap, limit_reason)
            watch_cap -= len(result.watches)
            results.append(tuple(result))  # marshal carries plain tuples only
        marshal.dump(results, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except BaseException:  # noqa: BLE001 - see the docstring: nothing may be printed
        os._exit(1)
    os._exit(0)
