"""Every verdict on its own: what a share's generation means (readers/shares.py `judge`), the keepGenerations
the exporter recommends, and the problems and summaries the log and `check` print with their fixes
(collector/shares.py, collector/stores.py). Values in, values out: no mount, no process, any user.

The prediction "pruned on the next switch" is checked against a switch done the way sops-nix does it
(tests/sopsnix.py, on plain directories), not against its own formula.
"""

from __future__ import annotations

import dataclasses

import pytest

from sops_nix_exporter.collector.shares import share_problems, share_summary
from sops_nix_exporter.collector.stores import LISTING_HINT, store_problems, store_summary
from sops_nix_exporter.readers.shares import FILE_HANDLE, Share, StoreShares, Verdict, exposes_store, judge
from sops_nix_exporter.readers.virtiofsd import Held
from sops_nix_exporter.stores.scan import StoreScan, SymlinkState, Usage

from proctree import SECRETS_DEVICE, store_scan
from sopsnix import SopsStore

pytestmark = pytest.mark.unit

MP = "/run/secrets.d"


def store(current: int | None = 3, keep: int | None = 1, numbers: list[int] | None = None) -> StoreScan:
    numbers = numbers if numbers is not None else list(range(1, (current or 0) + 1))
    return store_scan(MP, "/run/secrets", SECRETS_DEVICE, numbers, current, keep)


def serving(held: Held | None, vm: str = "web", up: bool = True, source: str = "/run/secrets",
            writable: bool | None = None) -> Share:  # fmt: skip
    """A share as scan_shares makes it; whether it exposes the store is the readers' own verdict on its source."""
    return Share(vm=vm, share="secrets", mountpoint=MP, source=source, sandbox="namespace", up=up,
                 pids=(2101, 2108) if up else (), held=held, exposes_store=exposes_store(source, store()),
                 writable=writable)  # fmt: skip


def mounted(generation: int | None, deleted: bool = False, method: str = "mountinfo") -> Held:
    return Held(method, generation=generation, deleted=deleted, device=SECRETS_DEVICE)


def judged(share: Share, scan: StoreScan) -> Share:
    share.verdict = judge(share, scan)
    return share


# ---------------------------------------------------------------------------------------------------------
# judge


def test_current_generation():
    verdict = judge(serving(mounted(3)), store(current=3, keep=2))
    assert verdict == Verdict(known=True, stale=False, deleted=False, generations_behind=0,
                              pruned_on_next_switch=False, keep_to_spare=2)  # fmt: skip


def test_stale_generation():
    verdict = judge(serving(mounted(1)), store(current=3, keep=0))
    assert verdict == Verdict(known=True, stale=True, deleted=False, generations_behind=2,
                              pruned_on_next_switch=False, keep_to_spare=4)  # fmt: skip


def test_deleted_generation_cannot_be_spared_any_more():
    verdict = judge(serving(mounted(1, deleted=True)), store(current=3, keep=1, numbers=[3]))
    assert verdict == Verdict(known=True, stale=True, deleted=True, generations_behind=2,
                              pruned_on_next_switch=False, keep_to_spare=None)  # fmt: skip


def test_generation_above_the_current_one():
    """The symlink was pointed back (a rollback) under a VM that serves the newer generation."""
    verdict = judge(serving(mounted(4)), store(current=3, keep=1, numbers=[3, 4]))
    assert verdict == Verdict(known=True, stale=True, deleted=False, generations_behind=-1,
                              pruned_on_next_switch=False, keep_to_spare=1)  # fmt: skip


@pytest.mark.parametrize(
    "keep,served,expected",
    [
        (None, 3, None), (None, 1, None),  # keepGenerations not configured: nothing to predict
        (0, 3, False), (0, 1, False),  # 0 never prunes
        (1, 3, True), (1, 2, True),  # sops-nix's default deletes even the current one at the next switch
        (2, 3, False), (2, 2, True), (2, 1, True),
        (3, 2, False), (3, 1, True),
    ],
)  # fmt: skip
def test_pruned_on_next_switch(keep, served, expected):
    assert judge(serving(mounted(served)), store(current=3, keep=keep)).pruned_on_next_switch is expected


def survives_next_switch(tmp_path, current: int, served: int, keep: int) -> bool:
    """Generations 1..current, then one switch as sops-nix does it: is `served` still there?"""
    layout = SopsStore(tmp_path / f"store-{current}-{served}-{keep}.d", tmp_path / f"link-{current}-{served}-{keep}")
    layout.mountpoint.mkdir()
    for number in range(1, current + 1):
        layout.write_generation(number, {"x": "generation\n"})
    layout.link(current)
    layout.switch({"x": "next\n"}, keep_generations=keep)
    return layout.generation_path(served).exists()


@pytest.mark.parametrize("current", [1, 2, 4])
def test_prediction_and_keep_to_spare_match_a_real_switch(tmp_path, current):
    """For every served generation and keepGenerations: the prediction is what the switch then does, and
    keep_to_spare is the smallest keepGenerations (at least sops-nix's default, 1) the generation survives."""
    for served in range(1, current + 1):
        spared_from = None
        for keep in range(0, current + 3):
            survives = survives_next_switch(tmp_path, current, served, keep)
            verdict = judge(serving(mounted(served)), store(current=current, keep=keep))
            assert verdict.pruned_on_next_switch is (not survives), (current, served, keep)
            if survives and keep >= 1 and spared_from is None:
                spared_from = keep
        assert judge(serving(mounted(served)), store(current=current, keep=None)).keep_to_spare == spared_from


def test_nothing_known_without_a_current_generation():
    verdict = judge(serving(mounted(2)), store(current=None, keep=1, numbers=[1, 2]))
    assert verdict == Verdict(known=True, stale=True, deleted=False, generations_behind=None,
                              pruned_on_next_switch=None, keep_to_spare=None)  # fmt: skip


@pytest.mark.parametrize(
    "held,expected",
    [
        (None, Verdict()),  # down: nothing serves it
        (Held("denied"), Verdict(known=False)),
        (Held(FILE_HANDLE, device=SECRETS_DEVICE, inode=1), Verdict(known=False)),
        (Held("unpinned"), Verdict(known=True)),  # holds nothing yet: not stale
        (Held("mountinfo", whole_store=True, device=SECRETS_DEVICE), Verdict(known=True)),
        (Held("root", whole_store=True, deleted=True, device=SECRETS_DEVICE),
         Verdict(known=True, stale=True, deleted=True)),
    ],
    ids=["down", "denied", "file-handle", "unpinned", "whole-store", "whole-store-deleted"],
)  # fmt: skip
def test_nothing_served_that_a_generation_could_be_told_of(held, expected):
    assert judge(serving(held, up=held is not None), store(current=3, keep=1)) == expected


# ---------------------------------------------------------------------------------------------------------
# The keepGenerations to recommend


def recommended(scan: StoreScan, *shares: Share) -> int | None:
    return StoreShares(scan, [judged(s, scan) for s in shares]).recommended_keep_generations


def test_recommended_keep_generations():
    scan = store(current=3, keep=1)
    assert recommended(scan) == 1  # no share: sops-nix's default
    assert recommended(scan, serving(mounted(3))) == 2
    assert recommended(scan, serving(mounted(3), vm="a"), serving(mounted(1), vm="b")) == 4  # the oldest decides
    # A deleted generation, a share of the whole store, one holding nothing yet and one that is down cannot be
    # helped by any keepGenerations: they leave the recommendation alone.
    assert recommended(scan, serving(mounted(2)), serving(mounted(1, deleted=True), vm="b"),
                       serving(Held("mountinfo", whole_store=True), vm="c"), serving(Held("unpinned"), vm="d"),
                       serving(None, vm="e", up=False)) == 3  # fmt: skip


@pytest.mark.parametrize("method", ["denied", FILE_HANDLE])
def test_no_recommendation_while_a_served_generation_is_unknown(method):
    scan = store(current=3, keep=1)
    assert recommended(scan, serving(mounted(3)), serving(Held(method), vm="b")) is None


def test_no_recommendation_without_a_current_generation():
    assert recommended(store(current=None, keep=1, numbers=[1]), serving(mounted(1))) is None


def test_pinned_generations_are_distinct():
    scan = store(current=3, keep=0)
    group = StoreShares(scan, [judged(serving(mounted(g), vm=vm), scan) for vm, g in (("a", 1), ("b", 1), ("c", 3))])
    assert group.pinned_generations == {1, 3}


# ---------------------------------------------------------------------------------------------------------
# The shares' problems and summaries


def problems(share: Share, scan: StoreScan) -> dict[str, tuple[str, str, str]]:
    """key suffix -> (severity, message, hint)"""
    found = {}
    for problem in share_problems(judged(share, scan), scan):
        prefix = f"{share.vm}/{share.share}/{share.mountpoint}:"
        assert problem.key.startswith(prefix), problem.key
        found[problem.key[len(prefix) :]] = (problem.severity, problem.message, problem.hint)
    return found


def test_share_deleted_generation():
    found = problems(serving(mounted(1, deleted=True)), store(current=3, keep=1, numbers=[3]))
    assert found == {"deleted": (
        "critical",
        "VM web share secrets (/run/secrets.d): serves generation 1, which was deleted: the guest sees an empty "
        "directory",
        "restart microvm@web (restarts its virtiofsd too) to serve the current generation",
    )}  # fmt: skip


def test_share_pruned_on_next_switch_and_stale():
    found = problems(serving(mounted(2)), store(current=3, keep=2))
    assert found == {
        "pruned_next": (
            "warning",
            "VM web share secrets (/run/secrets.d): serves generation 2, which the next switch deletes "
            "(keepGenerations = 2)",
            "set sops.keepGenerations = 3, or 0 to never prune (each kept generation costs memory, and the VM "
            "reads stale secrets until restarted), or restart microvm@web right after each switch",
        ),
        "stale": (
            "warning",
            "VM web share secrets (/run/secrets.d): serves generation 2, current is 3: the VM does not see rotated "
            "secrets",
            "restart microvm@web (restarts its virtiofsd too) to serve the current generation",
        ),
    }


def test_share_current_but_pruned_on_next_switch():
    """sops-nix's default, keepGenerations = 1, deletes the generation a VM serves at every switch."""
    found = problems(serving(mounted(3)), store(current=3, keep=1))
    assert list(found) == ["pruned_next"]
    assert "(keepGenerations = 1)" in found["pruned_next"][1]
    assert found["pruned_next"][2].startswith("set sops.keepGenerations = 2, or 0 to never prune")


def test_share_down():
    found = problems(serving(None, vm="mail", up=False), store(current=3, keep=1))
    assert found == {"down": (
        "critical",
        "VM mail share secrets (/run/secrets.d): declared, but no virtiofsd serves it: the VM has no secrets",
        "restart microvm@mail, which restarts microvm-virtiofsd@mail too (starting microvm-virtiofsd@mail does "
        "nothing while its supervisord runs)",
    )}  # fmt: skip


def test_share_denied():
    found = problems(serving(Held("denied")), store())
    assert found == {"denied": (
        "warning",
        "VM web share secrets (/run/secrets.d): cannot tell which generation it serves (needs CAP_SYS_PTRACE, and "
        "CAP_DAC_READ_SEARCH for an unsandboxed virtiofsd)",
        "grant the exporter CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH",
    )}  # fmt: skip


def test_share_file_handle():
    found = problems(serving(Held(FILE_HANDLE)), store())
    assert found == {"file_handle": (
        "warning",
        "VM web share secrets (/run/secrets.d): cannot tell which generation it serves: its unsandboxed virtiofsd "
        "holds the shared directory as a file handle, which /proc does not show",
        'run it in virtiofsd\'s default namespace sandbox (drop --sandbox=none from microvm.virtiofsd.extraArgs), '
        'or set microvm.virtiofsd.inodeFileHandles = "never"; then restart microvm@web',
    )}  # fmt: skip


def test_share_of_the_mount_point():
    """Critical: it says what the guest can read, and the fix is the symlink (or a subdirectory of it). A share of
    a directory above the mount point (/run) is the same finding."""
    expected = {"whole_store": (
        "critical",
        "VM build share secrets (/run/secrets.d): shares the store's mount point (or a directory above it), not "
        "its symlink: the guest can read every generation the host keeps and sops-nix's key file "
        "(age-keys.txt) if one is there",
        "share /run/secrets (or a subdirectory of secrets meant for this VM) instead and restart microvm@build; "
        "treat the key and every secret the guest could read as known to it",
    )}  # fmt: skip
    assert problems(serving(Held("mountinfo", whole_store=True), vm="build", source=MP), store()) == expected
    assert problems(serving(Held("unpinned"), vm="build", source="/run"), store()) == expected
    # Below the mount point (a generation) or the symlink, nothing is exposed.
    assert not serving(Held("unpinned"), source=f"{MP}/3").exposes_store
    assert not serving(Held("unpinned"), source="/run/secrets/web").exposes_store


def test_writable_share():
    found = problems(serving(mounted(3), writable=True), store(current=3, keep=0))
    assert found == {"writable": (
        "warning",
        "VM web share secrets (/run/secrets.d): the guest can write the share (virtiofsd without --readonly), and "
        "so change the secrets the host reads from the same generation",
        "set microvm.shares.*.readOnly = true for it, then restart microvm@web",
    )}  # fmt: skip
    assert problems(serving(mounted(3), writable=False), store(current=3, keep=0)) == {}


def test_current_share_with_keep_to_spare_is_fine():
    assert problems(serving(mounted(3)), store(current=3, keep=2)) == {}
    assert problems(serving(Held("unpinned")), store(current=3, keep=1)) == {}


SHARE_CASES = {
    "current": (mounted(3), 2),
    "current-keep-1": (mounted(3), 1),
    "stale": (mounted(2), 0),
    "stale-pruned": (mounted(1), 2),
    "deleted": (mounted(1, deleted=True), 1),
    "down": (None, 1),
    "denied": (Held("denied"), 1),
    "file-handle": (Held(FILE_HANDLE), 1),
    "whole-store": (Held("mountinfo", whole_store=True), 1),
    "unpinned": (Held("unpinned"), 1),
}


@pytest.mark.parametrize("case", sorted(SHARE_CASES))
def test_no_fix_ever_advises_sharing_the_mount_point(case):
    """Sharing /run/secrets.d hands the guest every generation and sops-nix's key: no fix may point there."""
    held, keep = SHARE_CASES[case]
    scan = store(current=3, keep=keep)
    share = judged(serving(held, up=held is not None), scan)
    for problem in share_problems(share, scan):
        assert MP not in problem.hint, (case, problem.hint)
        assert "mount point" not in problem.hint, (case, problem.hint)


@pytest.mark.parametrize(
    "held,up,expected",
    [
        (mounted(3), True, "serves generation 3, current 3: current"),
        (mounted(2), True, "serves generation 2, current 3: stale"),
        (mounted(1, deleted=True), True, "serves generation 1, current 3: deleted"),
        (None, False, "DOWN (declared, no virtiofsd)"),
        (Held("denied"), True, "served generation unknown (needs CAP_SYS_PTRACE)"),
        (Held("unpinned"), True, "virtiofsd holds nothing yet (its VM has not connected)"),
        (Held(FILE_HANDLE), True, "served generation unknown (an unsandboxed virtiofsd holds it as a file handle)"),
        (Held("mountinfo", whole_store=True), True,
         "serves the store's whole mount point: every generation, and sops-nix's key file if it is there"),
    ],
    ids=["current", "stale", "deleted", "down", "denied", "unpinned", "file-handle", "whole-store"],
)  # fmt: skip
def test_share_summary(held, up, expected):
    scan = store(current=3, keep=1)
    share = judged(serving(held, up=up), scan)
    assert share_summary(share, scan) == f"VM web share secrets (/run/secrets in {MP}): {expected}"


# ---------------------------------------------------------------------------------------------------------
# The stores' problems and summaries


def store_findings(scan: StoreScan) -> dict[str, tuple[str, str, str]]:
    found = {}
    for problem in store_problems(scan):
        assert problem.key.startswith(f"{MP}:"), problem.key
        found[problem.key[len(MP) + 1 :]] = (problem.severity, problem.message, problem.hint)
    return found


def down(reason: str) -> StoreScan:
    return StoreScan(mountpoint=MP, symlink="/run/secrets", up=False, keep_generations=1, memory_budget_bytes=0,
                     down_reason=reason)  # fmt: skip


def test_store_that_is_not_there_is_no_problem():
    assert store_findings(down("missing")) == {}
    assert store_summary(down("missing")) == (
        "store /run/secrets.d: not present (no secrets of this kind on this host, or sops-nix has not run)"
    )


def test_store_that_cannot_be_listed():
    assert store_findings(down("permission_denied")) == {
        "down": ("critical", "store /run/secrets.d cannot be listed (permission_denied)", LISTING_HINT)
    }
    assert "CAP_DAC_READ_SEARCH" in LISTING_HINT and "root:keys" in LISTING_HINT
    assert store_findings(down("not_a_directory")) == {
        "down": ("critical", "store /run/secrets.d cannot be listed (not_a_directory)",
                 "check the store's mountpoint in the configuration")
    }  # fmt: skip
    assert store_summary(down("permission_denied")) == "store /run/secrets.d: cannot be listed (permission_denied)"


def test_healthy_store():
    scan = store(current=3, keep=1, numbers=[3])
    assert store_findings(scan) == {}
    assert store_summary(scan) == (
        "store /run/secrets.d (ramfs): 1 generation(s), 16.0 KiB of a 1.0 MiB budget (1.6%), current generation 3, "
        "symlink /run/secrets ok"
    )


@pytest.mark.parametrize(
    "state,hint",
    [
        (SymlinkState.DANGLING, "re-run the activation (nixos-rebuild switch) so sops-nix links a generation"),
        (SymlinkState.MISSING, "re-run the activation (nixos-rebuild switch) so sops-nix links a generation"),
        (SymlinkState.OUTSIDE, "re-run the activation (nixos-rebuild switch) so sops-nix links a generation"),
        (SymlinkState.UNREADABLE, LISTING_HINT),
    ],
)
def test_store_symlink_not_ok(state, hint):
    scan = dataclasses.replace(store(current=None, keep=1, numbers=[1, 2]), symlink_state=state)
    assert store_findings(scan) == {
        "symlink": ("critical", f"store /run/secrets.d: symlink /run/secrets is {state.value}", hint)
    }
    assert store_summary(scan).endswith(f"current generation none, symlink /run/secrets {state.value}")


def test_store_findings_each_with_its_fix():
    scan = dataclasses.replace(store(current=2, keep=1, numbers=[2, 3, 4]), mounts=2, fstype="ext4",
                               scan_errors={"permission_denied": 2, "vanished": 5, "error": 1})  # fmt: skip
    assert store_findings(scan) == {
        "stacked": ("warning", "store /run/secrets.d: 2 filesystems are mounted on it; the lower ones still hold "
                    "memory", "reboot, or unmount the hidden lower mount once nothing serves it"),
        "fstype": ("warning", "store /run/secrets.d is on ext4, not ramfs or tmpfs: its secrets may be written to "
                   "disk", "let sops-nix mount its ramfs there (the default), or set sops.useTmpfs"),
        "pending": ("info", "store /run/secrets.d: 2 generation(s) above the current one were written but never "
                    "linked", "an activation failed or was a dry-activate; the next successful switch supersedes "
                    "them"),
        # A prune racing the scan ("vanished") is expected and not told.
        "scan:error": ("warning", "store /run/secrets.d: 1 part(s) could not be read (error); byte counts are a "
                       "lower bound", ""),
        "scan:permission_denied": ("warning", "store /run/secrets.d: 2 part(s) could not be read "
                                   "(permission_denied); byte counts are a lower bound", LISTING_HINT),
    }  # fmt: skip


@pytest.mark.parametrize(
    "budget,expected",
    [
        (20480, None),  # 12 KiB of 20 KiB: 60%
        (15360, ("near_budget", "warning", "store /run/secrets.d: its generations hold 12288 bytes, 80% of the budget "
                 "of 15360 bytes", "lower keepGenerations before the budget is reached, or raise memory_budget_bytes")),
        (12288, ("over_budget", "critical", "store /run/secrets.d: its generations hold 12288 bytes, at or over the "
                 "budget of 12288 bytes", "lower keepGenerations, or reboot to reclaim the memory, or raise "
                 "memory_budget_bytes")),
        (0, None),  # no budget
    ],
)  # fmt: skip
def test_store_memory_budget(budget, expected):
    scan = dataclasses.replace(store(current=3, keep=0, numbers=[1, 2, 3]), memory_budget_bytes=budget)
    scan.generations = [dataclasses.replace(g, usage=Usage(files=1, bytes=4096, apparent_bytes=64))
                        for g in scan.generations]  # fmt: skip
    scan.current = scan.generations[-1]
    found = store_findings(scan)
    assert found == ({} if expected is None else {expected[0]: expected[1:]})


def test_store_summary_without_a_budget():
    scan = dataclasses.replace(store(current=3, keep=0, numbers=[1, 2, 3]), memory_budget_bytes=0, fstype=None)
    assert store_summary(scan) == (
        "store /run/secrets.d (unknown fs): 3 generation(s), 48.0 KiB of a 0 B budget, current generation 3, "
        "symlink /run/secrets ok"
    )


def test_no_store_fix_advises_sharing_the_mount_point():
    scan = dataclasses.replace(store(current=2, keep=1, numbers=[2, 3]), mounts=2, fstype="ext4",
                               memory_budget_bytes=1, scan_errors={"permission_denied": 1, "error": 1})  # fmt: skip
    hints = [p.hint for p in store_problems(scan)] + [p.hint for p in store_problems(down("permission_denied"))]
    assert len(hints) == 7
    assert not [h for h in hints if "share" in h], hints
