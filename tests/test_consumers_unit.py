"""The consumers reader (exporter/readers/mounts.py) over small /proc trees: naming, the generations a mount
table holds, and namespaces told apart without CAP_SYS_PTRACE (no ns/mnt link: by the mount table)."""

from __future__ import annotations

import pytest

from sops_nix_exporter.readers import mounts

from proctree import ProcTree, fixture_stores

pytestmark = pytest.mark.unit

def host(root_id: int = 20) -> str:
    """A namespace's mount table: its own root mount first (no other namespace has that mount's ID)."""
    return (f"{root_id} 1 254:0 / / rw - ext4 /dev/vda rw\n22 {root_id} 0:21 / /proc rw - proc proc rw\n"
            f"47 {root_id} 0:41 / /run/secrets.d rw - ramfs ramfs rw\n")


HOST = host()


def bind(root: str, target: str = "/run/secrets", mount_id: int = 80) -> str:
    """A mount table line: the store's ramfs (0:41), root inside it, mounted at target."""
    return f"{mount_id} 47 0:41 {root} {target} ro,relatime - ramfs ramfs rw\n"


@pytest.mark.parametrize("cgroup,expected", [
    ("/machine.slice/container@web.service/payload/system.slice/nginx.service", ("container@web.service", "container")),
    ("/machine.slice/systemd-nspawn@db.service/payload", ("systemd-nspawn@db.service", "container")),
    ("/system.slice/docker-0123456789abcdef.scope", ("docker-0123456789abcdef.scope", "container")),
    ("/machine.slice/libpod-fedcba9876543210.scope/container", ("libpod-fedcba9876543210.scope", "container")),
    ("/system.slice/backup.service", ("backup.service", "service")),
    ("/system.slice/system-app.slice/app@a\\x2db.service", ("app@a-b.service", "service")),
    ("/user.slice/user-1000.slice/session-3.scope", ("cat", "process")),
])  # fmt: skip
def test_named_by_the_unit_of_its_cgroup_else_by_its_command_name(tmp_path, cgroup, expected):
    tree = ProcTree(tmp_path / "proc")
    tree.process(10, ["/run/current-system/sw/bin/cat", "--secret-looking-argument"], comm="cat", cgroup=cgroup,
                 mountinfo=HOST + bind("/3"))  # fmt: skip
    found = mounts.scan_consumers(fixture_stores(), str(tree))
    assert [(c.consumer, c.kind) for c in found.consumers] == [expected]


def test_generations_held_and_what_is_not_a_consumer(tmp_path):
    tree = ProcTree(tmp_path / "proc")
    tree.process(10, ["a"], comm="a", cgroup="/system.slice/a.service", mountinfo=host(30) + bind("/3"))
    tree.process(11, ["b"], comm="b", cgroup="/system.slice/b.service", mountinfo=host(31) + bind("/2/rendered//deleted"))
    tree.process(12, ["c"], comm="c", cgroup="/system.slice/c.service", mountinfo=host(32))  # the store as the host has it
    tree.process(13, ["v"], comm="virtiofsd", cgroup="/system.slice/microvm-virtiofsd@web.service",
                 mountinfo="72 47 0:41 /2 / rw - ramfs ramfs rw\n")  # the VM shares' family, not repeated here
    # Two generations in one namespace: the worse (deleted, then the oldest) is what it reads wrong.
    tree.process(14, ["d"], comm="d", cgroup="/system.slice/d.service",
                 mountinfo=host(33) + bind("/3", "/srv/a", 81) + bind("/2", "/srv/b", 82))  # fmt: skip
    found = mounts.scan_consumers(fixture_stores(), str(tree))
    held = {c.consumer: (c.generation, c.deleted) for c in found.consumers}
    assert held == {"a.service": (3, False), "b.service": (2, True), "d.service": (2, False)}
    assert found.namespaces == 4  # a, b, c, d: virtiofsd is not read


def test_processes_of_one_namespace_are_one_consumer_without_ns_links(tmp_path):
    """Without CAP_SYS_PTRACE ns/mnt cannot be read: processes whose mount tables begin with the same root
    mount are one namespace, read once."""
    tree = ProcTree(tmp_path / "proc")
    table = HOST + bind("/3")
    for pid in (10, 11, 12):
        tree.process(pid, ["nginx"], comm="nginx", cgroup="/machine.slice/container@web.service/payload", mountinfo=table)
    tree.process(13, ["x"], comm="x", cgroup="/system.slice/x.service", mountinfo=None)  # exited meanwhile
    found = mounts.scan_consumers(fixture_stores(), str(tree))
    assert [(c.consumer, c.generation) for c in found.consumers] == [("container@web.service", 3)]
    # A process that exited between the listing and its mount table is not "unreadable": nothing to report.
    assert found.namespaces == 1 and found.unreadable == 0
