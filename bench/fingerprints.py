"""Content fingerprints (issue 15): what they cost, printed, not asserted.

- fingerprinting one 50-file generation (45 secrets, 5 templates of about 2.7 KB: bench/run.py's layout), as
  `sops-nix-exporter fingerprint` does after each activation;
- the comparison a scrape makes (list the store's fingerprints, the current one, the one it replaced, the one
  a reader holds, and the diff), warm (parsed once, as in `serve`) and cold;
- a warm scrape of the whole exporter (stores and shares collectors) at --generations generations with every
  generation fingerprinted, against the same scrape without fingerprints.

Run as root from the repository (it mounts a ramfs in a temporary directory and unmounts it at the end):

    sudo .venv/bin/python bench/fingerprints.py                  # 5,000 generations
    sudo .venv/bin/python bench/fingerprints.py --generations 500
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, Store, interleaved, timed, wait_until_settled  # noqa: E402

from sops_nix_exporter import fingerprint  # noqa: E402
from sops_nix_exporter.collector.frame import Exporter  # noqa: E402
from sops_nix_exporter.collector.shares import SharesCollector  # noqa: E402
from sops_nix_exporter.collector.stores import StoresCollector  # noqa: E402
from sops_nix_exporter.config import Config, MicrovmConfig  # noqa: E402
from sops_nix_exporter.readers.fingerprints import FingerprintReader, differing  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/fingerprints.py needs root: it mounts a ramfs")
        return 2
    base = Path(tempfile.mkdtemp(prefix="sopsnix-bench-fingerprints-"))
    store = Store(base, "secrets.d", "ramfs", SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, seed=15)
    try:
        print(f"store: ramfs, {args.generations} generations of {SECRETS_PER_GENERATION + TEMPLATES_PER_GENERATION} files")
        store.grow(args.generations)
        fingerprints = base / "fingerprints"
        config = Config(stores=[store.config()], microvm=MicrovmConfig(state_dir=str(base / "microvms")),
                        fingerprint_dir=str(fingerprints))  # fmt: skip
        started = time.perf_counter()
        result = fingerprint.run(config)
        first = time.perf_counter() - started
        print(f"first run over every generation: {first:.1f} s ({result.written} written, "
              f"{1000 * first / max(result.written, 1):.2f} ms a generation)")  # fmt: skip
        key = (fingerprints / "key").read_bytes()
        current = f"{store.mountpoint}/{store.numbers[-1]}"
        device = os.stat(current).st_dev
        one = timed(lambda: fingerprint.fingerprint_generation(key, current, device), args.repeat)
        print(f"fingerprinting one 50-file generation: {one}")
        again = timed(lambda: fingerprint.run(config), 5)
        print(f"a run with nothing new (identity of every generation checked): {again}")

        wait_until_settled()
        with_fingerprints = Exporter([StoresCollector(config), SharesCollector(config)])
        without = Config(stores=[store.config()], microvm=MicrovmConfig(state_dir=str(base / "microvms")),
                         fingerprint_dir=str(base / "none"))  # fmt: skip
        plain = Exporter([StoresCollector(without), SharesCollector(without)])
        with_fingerprints.collect(), plain.collect()  # cold scans: the cache and the parsed fingerprints
        scans = with_fingerprints.collect().runs["stores"].result.stores
        reader = FingerprintReader(str(fingerprints))

        def compare(cold: bool) -> int:
            fresh = FingerprintReader(str(fingerprints)) if cold else reader
            listed = fresh.store(scans[0])
            old, new = listed.of(store.numbers[0]), listed.of(store.numbers[-1])
            return differing(old, new) + differing(listed.replaced(), new)

        warm_compare, cold_compare = timed(lambda: compare(False), args.repeat), timed(lambda: compare(True), args.repeat)
        print(f"the comparison a scrape makes (a reader on the oldest generation): warm {warm_compare}, cold {cold_compare}")
        scrapes = interleaved({"with": with_fingerprints.collect, "without": plain.collect}, args.repeat)
        print(f"warm scrape of both collectors, every generation fingerprinted: {scrapes['with']}")
        print(f"warm scrape of both collectors, no fingerprints:               {scrapes['without']}")
        print(f"with / without = {scrapes['with'].best / scrapes['without'].best:.2f}")
    finally:
        store.unmount()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
