"""What a served generation means for its reader (a VM share, a container, a service), against its store's
current generation and keepGenerations: computed once, read by metrics, problems and `check` alike."""

from __future__ import annotations

from dataclasses import dataclass

from sops_nix_exporter.stores.scan import StoreScan


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a share's generation means, against its store's current generation and keepGenerations."""

    known: bool = False  # what it serves could be told (not denied, not a file handle, not down)
    stale: bool = False
    deleted: bool = False
    generations_behind: int | None = None
    pruned_on_next_switch: bool | None = None  # None when unknowable (no keepGenerations, nothing served)
    # The smallest keepGenerations under which the next switch spares the served generation; None if none does.
    keep_to_spare: int | None = None


def serving(served: int, deleted: bool, store: StoreScan, known: bool = True) -> Verdict:
    """The verdicts on a reader that holds generation `served`. The next switch makes current + 1 current and
    deletes every generation <= current + 1 - keep, so a served generation s survives it when
    keep >= current + 2 - s."""
    current = store.current.number if store.current else None
    keep = store.keep_generations
    behind = current - served if current is not None else None
    pruned_next = None
    if keep is not None and current is not None:
        pruned_next = False if deleted or keep == 0 else served <= current + 1 - keep
    keep_to_spare = max(1, current + 2 - served) if current is not None and not deleted else None
    return Verdict(known=known, stale=served != current, deleted=deleted, generations_behind=behind,
                   pruned_on_next_switch=pruned_next, keep_to_spare=keep_to_spare)  # fmt: skip
