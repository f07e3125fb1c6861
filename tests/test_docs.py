"""docs/metrics.md documents every metric the exporter can publish, with its labels."""

import re
from pathlib import Path

from sops_nix_exporter.app import collectors
from sops_nix_exporter.collector.build_info import BUILD_INFO
from sops_nix_exporter.config import Config
from sops_nix_exporter.collector.frame import SCRAPE_DURATION, SCRAPE_SUCCESS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()


def documented_rows() -> dict[str, set[str]]:
    rows = {}
    for match in re.finditer(r"^\| `(sopsnix_[a-z0-9_]+)` \| ([^|]*) \|", DOC, re.M):
        labels = {label.strip() for label in match.group(2).split(",") if label.strip() and "(none)" not in label}
        rows[match.group(1)] = labels
    return rows


def published_specs():
    specs = [spec for collector in collectors(Config()) for spec in collector.metrics]
    return specs + [BUILD_INFO, SCRAPE_SUCCESS, SCRAPE_DURATION]


def test_every_metric_is_documented_with_its_labels():
    rows = documented_rows()
    for spec in published_specs():
        assert spec.name in rows, f"{spec.name} is missing from docs/metrics.md"
        assert rows[spec.name] == set(spec.labels), f"{spec.name}: documented labels differ"


def test_nothing_documented_that_is_not_published():
    published = {spec.name for spec in published_specs()}
    assert set(documented_rows()) <= published


def test_every_documented_metric_has_an_example_line():
    examples = set(re.findall(r"^(sopsnix_[a-z0-9_]+)[{ ]", DOC, re.M))
    assert set(documented_rows()) - examples == set()


# Sharing the store's mount point with a VM hands it every generation the host keeps and sops-nix's private
# key (age-keys.txt is written into the mount point): no text meant for operators may offer it as a fix.
ROOT = Path(__file__).resolve().parent.parent
OPERATOR_TEXTS = ["README.md", "docs/*.md", "alerts/*", "exporter/*.py", "grafana/*.py", "grafana/dashboards/*",
                  "nix/*.nix"]  # fmt: skip
SHARE_MOUNT_POINT = re.compile(r"\bshar(e|es|ed|ing)\b.{0,80}?\bmount ?point\b.{0,80}?\b(instead|rather than)\b", re.I)
# Sentences, table cells and Python strings: a match never spans two of them.
SENTENCE_END = re.compile(r'(?<=[.;!?])\**\s+|\||"""')


def test_no_text_advises_sharing_the_mount_point():
    advice = []
    for pattern in OPERATOR_TEXTS:
        for path in sorted(ROOT.glob(pattern)):
            if not path.is_file():
                continue
            text = " ".join(path.read_text(errors="replace").split())
            for sentence in SENTENCE_END.split(text):
                if SHARE_MOUNT_POINT.search(sentence):
                    advice.append(f"{path.relative_to(ROOT)}: {sentence[:200]}")
    assert advice == []


def test_the_guard_finds_the_old_advice():
    """The advice as the runbook's table, the alert and `check` gave it before."""
    for old in [
        "| share the store's mount point (`/run/secrets.d`) instead of the symlink | virtiofsd serves the whole",
        "secrets directory turns empty. Share the store's mount point instead of the symlink, or raise",
        "or restart microvm@db right after each switch, or share the store's mount point instead of the symlink",
    ]:
        assert [s for s in SENTENCE_END.split(old) if SHARE_MOUNT_POINT.search(s)], old
