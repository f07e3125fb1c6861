"""Test support: reading an exposition the way Prometheus would (client_python's parser), by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sopsnix import SopsStore


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample's value, or None when the exposition has no such sample."""
    return samples(text).get((name, tuple(sorted(labels.items()))))


def series(text: str, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample_name, labels) in samples(text) if sample_name == name]


def share(text: str, vm: str, store: SopsStore) -> dict[str, float | None]:
    labels = {"vm": vm, "share": "secrets", "mountpoint": str(store.mountpoint)}
    return {
        "served": value(text, "sopsnix_vm_serving_generation", **labels),
        "stale": value(text, "sopsnix_vm_serving_stale_generation", **labels),
        "method": next((dict(k[1])["method"] for k in samples(text) if k[0] == "sopsnix_vm_share_detection"
                        and dict(k[1])["vm"] == vm), None),  # fmt: skip
    }
