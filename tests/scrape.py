"""Test support: reading an exposition the way Prometheus would (client_python's parser), by name and labels.

Every helper takes the exposition's text or what samples() made of it, so a test that looks up many values
parses the text once.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sopsnix import SopsStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str | Samples) -> Samples:
    """Every sample, keyed by its name and its sorted labels."""
    if not isinstance(text, str):
        return text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(exposition: str | Samples, name: str, **labels: str) -> float | None:
    """The value of the sample with exactly these labels, or None when the exposition has no such sample."""
    return samples(exposition).get((name, tuple(sorted(labels.items()))))


def series(exposition: str | Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample_name, labels) in samples(exposition) if sample_name == name]


def share(exposition: str | Samples, vm: str, store: SopsStore) -> dict[str, float | None]:
    found = samples(exposition)
    labels = {"vm": vm, "share": "secrets", "mountpoint": str(store.mountpoint)}
    return {
        "served": value(found, "sopsnix_vm_serving_generation", **labels),
        "stale": value(found, "sopsnix_vm_serving_stale_generation", **labels),
        "method": next((dict(k[1])["method"] for k in found if k[0] == "sopsnix_vm_share_detection"
                        and dict(k[1])["vm"] == vm), None),  # fmt: skip
    }
