"""The parsers, on their own: virtiofsd's command lines (both syntaxes), the kernel's mount table, the /proc
reads, and microvm.nix's declarations and names, from the fixture host (tests/fixtures/) and small trees.
Unprivileged: no mount, no process started."""

from __future__ import annotations

import os

import pytest

from sops_nix_exporter import mountinfo
from sops_nix_exporter.readers import microvm
from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers.microvm import DeclaredShare
from sops_nix_exporter.readers.virtiofsd import Command, parse_command

from proctree import C_VIRTIOFSD, FIXTURE_PROC, FIXTURE_STATE_DIR, RUST_VIRTIOFSD, ProcTree, read_cmdline, rust_command

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------------------
# virtiofsd's command line


COMMANDS = {
    # microvm.nix's own: = form, namespace sandbox by default
    "microvm.nix": (rust_command("web-virtiofs-secrets.sock", "/run/secrets"),
                    Command("/run/secrets", "web-virtiofs-secrets.sock", "namespace")),
    "readonly": (rust_command("web-virtiofs-secrets.sock", "/run/secrets", "--readonly"),
                 Command("/run/secrets", "web-virtiofs-secrets.sock", "namespace", readonly=True)),
    "extraArgs-chroot": (rust_command("web-virtiofs-secrets.sock", "/run/secrets", "--sandbox=chroot"),
                         Command("/run/secrets", "web-virtiofs-secrets.sock", "chroot")),
    "extraArgs-none": (rust_command("web-virtiofs-secrets.sock", "/run/secrets", "--readonly", "--sandbox=none"),
                       Command("/run/secrets", "web-virtiofs-secrets.sock", "none", readonly=True)),
    "space-form": ([RUST_VIRTIOFSD, "--socket-path", "s.sock", "--shared-dir", "/run/secrets", "--sandbox", "chroot"],
                   Command("/run/secrets", "s.sock", "chroot")),
    "socket-alias": ([RUST_VIRTIOFSD, "--socket=/run/s.sock", "--shared-dir=/run/secrets/"],
                     Command("/run/secrets/", "/run/s.sock", "namespace")),
    "empty-sandbox": ([RUST_VIRTIOFSD, "--shared-dir=/run/secrets", "--sandbox="],
                      Command("/run/secrets", None, "namespace")),
    "last-shared-dir-wins": ([RUST_VIRTIOFSD, "--shared-dir=/srv", "--shared-dir=/run/secrets"],
                             Command("/run/secrets", None, "namespace")),
    # QEMU's C virtiofsd
    "c": ([C_VIRTIOFSD, "--socket-path=api-virtiofs-sops.sock", "-o", "source=/run/secrets/", "-o", "cache=auto",
           "-o", "sandbox=chroot"],
          Command("/run/secrets/", "api-virtiofs-sops.sock", "chroot")),
    "c-default-sandbox": ([C_VIRTIOFSD, "--socket-path=api.sock", "-o", "source=/run/secrets/", "-o", "cache=auto"],
                          Command("/run/secrets/", "api.sock", "namespace")),
    "c-one-option-list": ([C_VIRTIOFSD, "-o", "source=/run/secrets/,cache=auto,sandbox=chroot,vhost_user_socket=/v.sock"],
                          Command("/run/secrets/", "/v.sock", "chroot")),
    "c-attached": ([C_VIRTIOFSD, "-osource=/run/secrets/", "-o=sandbox=namespace"],
                   Command("/run/secrets/", None, "namespace")),
    "truncated-after-source": ([RUST_VIRTIOFSD, "--shared-dir=/run/secrets", "--socket-path"],
                               Command("/run/secrets", None, "namespace")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(COMMANDS))
def test_parse_command(case):
    argv, expected = COMMANDS[case]
    assert parse_command(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["virtiofsd"],
        ["virtiofsd", "--help"],
        ["virtiofsd", "--shared-dir"],  # truncated: the value is missing
        ["virtiofsd", "--socket-path=x.sock", "--shared-dir"],
        ["virtiofsd", "-o"],
        ["virtiofsd", "-o", "cache=auto,sandbox=chroot"],  # options, but no source
        ["virtiofsd", "--shared-dir="],
        ["virtiofsd", "\x01\x02garbage", "--sandbox="],
        ["virtiofsd", "-o", ",,,=,"],
        ["virtiofsd", "\\xff\\xfe", "--socket-path=\\xff.sock"],  # what undecodable bytes become (proc.find)
    ],
    ids=["empty", "no-arguments", "help", "truncated", "truncated-after-socket", "truncated-o", "no-source",
         "empty-source", "garbage", "empty-options", "escaped-bytes"],
)  # fmt: skip
def test_command_lines_naming_no_shared_directory(argv):
    assert parse_command(argv) is None


def test_fixture_command_lines_parse_as_written():
    """The fixture's cmdline files, NUL-separated as the kernel gives them, in both syntaxes."""
    assert parse_command(read_cmdline(2101)) == Command("/run/secrets", "web-virtiofs-secrets.sock", "namespace")
    assert parse_command(read_cmdline(2201)) == Command("/run/secrets/", "api-virtiofs-sops.sock", "namespace")
    assert parse_command(read_cmdline(2501)) == Command("/run/secrets", "ci-virtiofs-secrets.sock", "namespace")
    assert parse_command(read_cmdline(2602)) is None


# ---------------------------------------------------------------------------------------------------------
# The mount table


def test_mountinfo_line_of_a_sandboxed_virtiofsd():
    """The line recorded from the real Rust virtiofsd in its namespace sandbox."""
    (mount,) = mountinfo.parse("72 47 0:41 /1 / rw,relatime - ramfs ramfs rw\n")
    assert mount == mountinfo.Mount(mount_id=72, parent_id=47, device=os.makedev(0, 41), root="/1", mount_point="/",
                                    fstype="ramfs", source="ramfs")  # fmt: skip
    (deleted,) = mountinfo.parse("72 47 0:41 /1//deleted / rw,relatime - ramfs ramfs rw")
    assert deleted.root == "/1//deleted"


def test_mountinfo_optional_fields():
    text = (
        "24 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "46 24 0:41 / /run/secrets.d rw,nosuid,nodev,relatime shared:25 master:3 propagate_from:2 - ramfs none "
        "rw,mode=751\n"
        "47 24 0:42 / /run/secrets-for-users.d rw,relatime unbindable - ramfs none rw,mode=751\n"
    )
    mounts = mountinfo.parse(text)
    assert [(m.mount_point, m.fstype, m.source, m.device) for m in mounts] == [
        ("/", "ext4", "/dev/vda1", os.makedev(254, 1)),
        ("/run/secrets.d", "ramfs", "none", os.makedev(0, 41)),
        ("/run/secrets-for-users.d", "ramfs", "none", os.makedev(0, 42)),
    ]


def test_mountinfo_escaped_paths():
    """The kernel writes space, tab, newline and backslash in paths as three octal digits."""
    text = (
        r"50 24 0:45 /a\040b /run/my\040secrets.d rw - tmpfs my\134source rw" + "\n"
        r"51 24 0:46 / /tmp/tab\011new\012line rw - ramfs ramfs rw" + "\n"
        r"52 24 0:47 / /tmp/gone\040(deleted) rw - ramfs ramfs rw" + "\n"
        r"53 24 0:48 / /tmp/not\08escape rw - ramfs ramfs rw" + "\n"
    )
    mounts = mountinfo.parse(text)
    assert [(m.root, m.mount_point, m.source) for m in mounts] == [
        ("/a b", "/run/my secrets.d", "my\\source"),
        ("/", "/tmp/tab\tnew\nline", "ramfs"),
        ("/", "/tmp/gone (deleted)", "ramfs"),
        ("/", "/tmp/not\\08escape", "ramfs"),  # not three octal digits: left as it is
    ]


def test_mountinfo_lines_that_cannot_be_read_are_skipped():
    text = (
        "garbage\n"
        "\n"
        "72 47 0:41 /1 / rw,relatime ramfs ramfs rw\n"  # no separator
        "x 47 0:41 /1 / rw,relatime - ramfs ramfs rw\n"
        "72 47 041 /1 / rw,relatime - ramfs ramfs rw\n"  # no major:minor
        "72 47 0:41 /1\n"  # truncated
        "73 47 0:41 /2 / rw - ramfs\n"  # no source: still a mount
        "74 47 0:43 /3 / rw,relatime - ramfs ramfs rw\n"
    )
    assert [(m.mount_id, m.root, m.fstype, m.source) for m in mountinfo.parse(text)] == [
        (73, "/2", "ramfs", ""),
        (74, "/3", "ramfs", "ramfs"),
    ]


def test_mounts_at_and_containing():
    mounts = mountinfo.parse(
        "24 1 254:1 / / rw - ext4 /dev/vda1 rw\n"
        "30 24 0:25 / /run rw - tmpfs tmpfs rw\n"
        "46 30 0:41 / /run/secrets.d rw - ramfs none rw\n"
        "48 46 0:44 / /run/secrets.d rw - tmpfs tmpfs rw\n"  # stacked on top
    )
    assert [m.device for m in mountinfo.mounts_at(mounts, "/run/secrets.d")] == [os.makedev(0, 41), os.makedev(0, 44)]
    assert mountinfo.mounts_at(mounts, "/run/secrets") == []
    assert mountinfo.containing(mounts, "/run/secrets.d/3").mount_id == 48  # the top one of the longest prefix
    assert mountinfo.containing(mounts, "/run/secrets").mount_id == 30  # a prefix of the name is not a parent
    assert mountinfo.containing(mounts, "/var/lib").mount_id == 24


# ---------------------------------------------------------------------------------------------------------
# /proc


def test_find_lists_virtiofsd_processes_only():
    found = {p.pid: p for p in procfs.find(str(FIXTURE_PROC), "virtiofsd")}
    # systemd, supervisord, bash and QEMU are not virtiofsd; 2603 has no cmdline left to read.
    assert sorted(found) == [2101, 2102, 2104, 2108, 2109, 2201, 2207, 2301, 2307, 2401, 2407, 2501, 2507, 2601, 2602]
    assert found[2108].ppid == 2101 and found[2101].ppid == 2090
    assert found[2101].argv == tuple(read_cmdline(2101))


def test_find_reads_parent_after_the_last_parenthesis(tmp_path):
    """A command name may itself contain ") " (a process renamed between the reads of comm and stat): stat is
    parsed after the last one. Undecodable bytes in a command line become visible escapes, fit for a label."""
    tree = ProcTree(tmp_path / "proc")
    directory = tree.process(40, ["virtiofsd", "--shared-dir=/run/secrets"], ppid=7)
    (directory / "stat").write_text("40 (virtiofsd) S 9) S 7 40 40 0 -1\n")
    (directory / "cmdline").write_bytes(b"virtiofsd\0--shared-dir=/run/\xffsecrets\0")
    tree.process(41, ["virtiofsd"]).joinpath("stat").write_text("41 (virtiofsd)\n")  # cut short: skipped
    (found,) = procfs.find(str(tree), "virtiofsd")
    assert (found.pid, found.ppid, found.argv) == (40, 7, ("virtiofsd", "--shared-dir=/run/\\xffsecrets"))


@pytest.mark.parametrize(
    "cap_eff,expected",
    [
        ("0000000000000000", {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": False}),
        ("0000000000080004", {"CAP_DAC_READ_SEARCH": True, "CAP_SYS_PTRACE": True}),  # the NixOS module's two
        ("0000000000080000", {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": True}),
        ("000001ffffffffff", {"CAP_DAC_READ_SEARCH": True, "CAP_SYS_PTRACE": True}),  # root
        ("not-hex", {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": False}),
    ],
)
def test_effective_capabilities(tmp_path, cap_eff, expected):
    tree = ProcTree(tmp_path / "proc")
    tree.capabilities(cap_eff)
    assert procfs.effective_capabilities(str(tree)) == expected


def test_capabilities_of_the_fixture_and_of_no_status(tmp_path):
    assert procfs.effective_capabilities(str(FIXTURE_PROC)) == {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": False}
    assert procfs.effective_capabilities(str(tmp_path)) == {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": False}


def test_process_that_is_gone():
    with pytest.raises(ProcessLookupError):
        procfs.mounts(2603, str(FIXTURE_PROC))
    with pytest.raises(ProcessLookupError):
        procfs.root(99999, str(FIXTURE_PROC))
    with pytest.raises(ProcessLookupError):
        procfs.open_directories(99999, str(FIXTURE_PROC))
    assert procfs.cgroup(2603, str(FIXTURE_PROC)) is None
    assert procfs.cwd(2603, str(FIXTURE_PROC)) is None


# ---------------------------------------------------------------------------------------------------------
# microvm.nix: declared shares, VM names, tags


def test_declared_shares_of_the_fixture():
    """booted/ wins over current/ (what the running VM was started from); a VM with only current/ is read
    from there. Shares of anything are listed here; scan_shares keeps those of a store."""
    assert microvm.declared_shares(str(FIXTURE_STATE_DIR)) == [
        DeclaredShare("api", "sops", "/run/secrets", "api-virtiofs-sops.sock", running=False),
        DeclaredShare("build", "secrets", "/run/secrets.d", "build-virtiofs-secrets.sock"),
        DeclaredShare("ci", "secrets", "/run/secrets", "ci-virtiofs-secrets.sock"),
        DeclaredShare("db", "secrets", "/run/secrets", "db-virtiofs-secrets.sock", running=False),
        DeclaredShare("mail", "secrets", "/run/secrets", "mail-virtiofs-secrets.sock"),
        DeclaredShare("web", "ro-store", "/nix/.ro-store", "web-virtiofs-ro-store.sock"),
        DeclaredShare("web", "secrets", "/run/secrets", "web-virtiofs-secrets.sock"),
        DeclaredShare("web", "secrets-for-users", "/run/secrets-for-users", "web-virtiofs-secrets-for-users.sock"),
        DeclaredShare("web", "storage", "/var/lib/microvms/web/storage", "web-virtiofs-storage.sock"),
    ]


def test_declared_shares_that_are_not_microvm_nix_s(tmp_path):
    base = tmp_path / "vm" / "booted" / "share" / "microvm" / "virtiofs"
    for tag, source in {"huge": "/" * (microvm.DECLARED_LIMIT + 1), "empty": "", "fine": "/run/secrets"}.items():
        (base / tag).mkdir(parents=True)
        (base / tag / "source").write_text(source)
    (base / "no-source").mkdir()
    assert microvm.declared_shares(str(tmp_path)) == [DeclaredShare("vm", "fine", "/run/secrets", "")]
    assert microvm.declared_shares(str(tmp_path / "absent")) == []


def name_of(tree: ProcTree, pid: int, state_dir: str = "/var/lib/microvms") -> str:
    return microvm.vm_name(pid, parse_command(read_cmdline(pid, tree.root)), state_dir, str(tree))


def test_vm_name_from_the_cgroup_then_the_socket(tmp_path):
    tree = ProcTree(tmp_path / "proc")
    # microvm-virtiofsd@VM.service, with systemd's escape of "-" in an instance name
    tree.process(10, rust_command("web-virtiofs-secrets.sock", "/run/secrets"),
                 cgroup="/machine.slice/microvm-virtiofsd@my\\x2dvm.service", cwd="/var/lib/microvms/web")
    # no unit: a relative socket, from the working directory under the state directory
    tree.process(11, rust_command("ci-virtiofs-secrets.sock", "/run/secrets"),
                 cgroup="/user.slice/user-0.slice/session-4.scope", cwd="/var/lib/microvms/ci")
    # an absolute socket under the state directory, whatever its name
    tree.process(12, rust_command("/var/lib/microvms/db/odd.sock", "/run/secrets"), cgroup="/system.slice/x.service")
    # outside the state directory: microvm.nix's socket name VM-virtiofs-TAG.sock
    tree.process(13, rust_command("/run/legacy-virtiofs-secrets.sock", "/run/secrets"), cgroup="/")
    # relative, and no working directory to read: the socket's name still tells
    tree.process(14, rust_command("mail-virtiofs-secrets.sock", "/run/secrets"))
    # nothing tells: never a word of the command line
    tree.process(15, rust_command("/run/vfs.sock", "/run/secrets"), cgroup="/system.slice/web.service")
    tree.process(16, [RUST_VIRTIOFSD, "--shared-dir=/run/secrets", "web"])
    assert [name_of(tree, pid) for pid in range(10, 17)] == ["my-vm", "ci", "db", "legacy", "mail", "unknown", "unknown"]


def test_vm_name_of_the_fixture():
    names = {pid: microvm.vm_name(pid, parse_command(read_cmdline(pid)), "/var/lib/microvms", str(FIXTURE_PROC))
             for pid in (2101, 2201, 2401, 2501)}  # fmt: skip
    assert names == {2101: "web", 2201: "api", 2401: "legacy", 2501: "ci"}


def test_share_tag_from_the_declaration_then_the_socket():
    declared = [
        DeclaredShare("web", "secrets", "/run/secrets", "web-virtiofs-secrets.sock"),
        DeclaredShare("web", "users", "/run/secrets-for-users/", "odd-name.sock"),
        DeclaredShare("db", "db-secrets", "/run/secrets", "db-virtiofs-db-secrets.sock"),
    ]

    def tag(vm: str, source: str, socket: str | None) -> str:
        return microvm.share_tag(vm, Command(source, socket, "namespace"), declared)

    assert tag("web", "/run/secrets", "web-virtiofs-secrets.sock") == "secrets"  # by socket
    assert tag("web", "/elsewhere", "/var/lib/microvms/web/odd-name.sock") == "users"  # by socket's name
    assert tag("web", "/run/secrets-for-users", "other.sock") == "users"  # by source, trailing slash aside
    assert tag("api", "/run/secrets", "api-virtiofs-sops.sock") == "sops"  # another VM's declaration: no
    assert tag("api", "/run/secrets", "/run/api-vfs.sock") == "api-vfs"  # the socket's name, less .sock
    assert tag("api", "/run/secrets", None) == "unknown"
