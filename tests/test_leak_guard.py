"""The guard in tests/leaks.py, which every test runs under (conftest's no_leaks), reports what it should."""

from __future__ import annotations

import os
import subprocess

import leaks


def test_a_descriptor_left_open_is_reported():
    before = leaks.descriptors()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert leaks.leaked_descriptors(before) == {fd: "/dev/null"}
    finally:
        os.close(fd)
    assert leaks.leaked_descriptors(before) == {}


def test_a_process_left_running_is_reported_and_ended_and_an_ended_one_is_not():
    before = set(leaks.children())
    ended = subprocess.Popen(["true"])
    ended.wait()
    running = subprocess.Popen(["sleep", "600"])
    try:
        assert leaks.leaked_children(before) == {running.pid: "sleep"}
        assert running.poll() is not None, "the guard ends what it reports"
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()


def test_an_orphan_is_reparented_to_the_test_process_and_seen():
    assert leaks.become_subreaper(), "PR_SET_CHILD_SUBREAPER should be available on Linux"
    before = set(leaks.children())
    # The shell starts a sleep in the background and exits: the sleep is re-parented to us, not to init.
    subprocess.run(["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 &"], check=True)
    found = leaks.leaked_children(before)
    assert list(found.values()) == ["sleep"], found
