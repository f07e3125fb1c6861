"""Command line: `serve` (the default), `check` and `textfile`.

Exit codes: 0 fine, 1 `check` found a problem (or a run-time failure), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys

from sops_nix_exporter import __version__, app, logs
from sops_nix_exporter.check import report
from sops_nix_exporter.config import Config, ConfigError, load_config
from sops_nix_exporter.textfile import write_atomically
from sops_nix_exporter.http.server import DEFAULT_LISTEN_ADDRESS, ListenAddressError, WebServer
from sops_nix_exporter.http.webconfig import WebConfigError, WebConfigSource

log = logging.getLogger("sops_nix_exporter")

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; this keeps the message on one line
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config.file", dest="config_file", metavar="PATH",
        help="YAML configuration file (default: both sops-nix stores at their standard paths)",
    )  # fmt: skip
    parser.add_argument("--log.level", dest="log_level", choices=sorted(logs.LEVELS), default="info")
    parser.add_argument("--log.format", dest="log_format", choices=logs.FORMATS, default="logfmt")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="sops-nix-exporter",
        description="Prometheus exporter for sops-nix secrets generations and the VM shares that serve them.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser("serve", help="serve /metrics over HTTP (the default command)")
    _common(serve)
    serve.add_argument(
        "--web.listen-address", dest="listen_address", default=DEFAULT_LISTEN_ADDRESS, metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN_ADDRESS})",
    )  # fmt: skip
    serve.add_argument(
        "--web.config.file", dest="web_config_file", metavar="PATH",
        help="TLS and basic authentication, in exporter-toolkit's web configuration format",
    )  # fmt: skip

    check = sub.add_parser("check", help="scan once and report in words; exit 1 if something needs doing")
    _common(check)

    textfile = sub.add_parser("textfile", help="scan once and write the metrics for node_exporter's textfile collector")
    _common(textfile)
    textfile.add_argument("--output", required=True, metavar="PATH", help="file to write, e.g. .../sops-nix.prom")

    fingerprint = sub.add_parser(
        "fingerprint", help="as root: write a keyed content fingerprint of every linked generation (reads secrets)"
    )
    _common(fingerprint)

    prune = sub.add_parser(
        "prune", help="as root: remove the generations nobody reads (a dry run unless --apply)"
    )
    _common(prune)
    prune.add_argument("--apply", action="store_true", help="remove them; without it, only say what would go")
    prune.add_argument("--min-age", dest="min_age", type=_seconds, default=60, metavar="SECONDS",
                       help="keep the generation that stopped being current less than this ago (default 60)")
    prune.add_argument("--lock-file", dest="lock_file", default="/run/sops-nix-exporter/prune.lock", metavar="PATH",
                       help="one run at a time (default /run/sops-nix-exporter/prune.lock)")
    return top


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    commands = ("serve", "check", "textfile", "fingerprint", "prune")
    if argv[:1] and argv[0] in ("-h", "--help", "--version"):
        return parser().parse_args(argv)
    # The command may follow its flags (`--log.format=json check`); without one, `serve` is meant.
    command = next((a for a in argv if a in commands), None)
    rest = list(argv)
    if command is None:
        command = "serve"
    else:
        rest.remove(command)
    return parser().parse_args([command, *rest])


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config_file)
    except ConfigError as exc:
        sys.stderr.write(f"sops-nix-exporter: configuration error: {exc}\n")
        raise SystemExit(EXIT_USAGE) from None


M_ARENA_MAX = -8  # glibc's mallopt parameter


def _one_malloc_arena() -> None:
    """glibc gives each thread that allocates while another does an arena of its own (up to 8 per CPU), and each
    keeps what was freed in it; the interpreter lock lets one thread run at a time anyway, so one arena costs no
    waiting and saves what the others would hold (about 1.5 MiB at 5,000 generations: docs/performance.md).
    Before any thread starts; an operator's MALLOC_ARENA_MAX is left as it is."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no libc symbols to look up, or no mallopt: not glibc
        return
    mallopt(M_ARENA_MAX, 1)


def _serve(args: argparse.Namespace, config: Config) -> int:
    _one_malloc_arena()
    _, registry = app.build(config)
    web_config = None
    if args.web_config_file is not None:
        try:
            web_config = WebConfigSource(args.web_config_file)
        except WebConfigError as exc:
            sys.stderr.write(f"sops-nix-exporter: web configuration error: {exc}\n")
            return EXIT_USAGE
    try:
        server = WebServer(args.listen_address, registry, web_config)
    except ListenAddressError as exc:
        sys.stderr.write(f"sops-nix-exporter: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(f"sops-nix-exporter: cannot listen on {args.listen_address}: {exc.strerror}\n")
        return EXIT_PROBLEM
    # Taken synchronously by the main thread: blocked here, before any thread exists, so every thread inherits
    # the block and the kernel cannot hand SIGTERM to a server thread, where a Python handler would wait for
    # the main thread to wake up by itself (seen under strace: the exporter ignored systemd's stop).
    shutdown_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, shutdown_signals)
    log.info(
        "listening",
        extra={"kv": {"address": args.listen_address, "port": server.port, "tls": server.tls, "version": __version__,
                      "stores": ",".join(s.mountpoint for s in config.stores)}},
    )  # fmt: skip
    server.start_in_thread()
    received = signal.sigwait(shutdown_signals)
    log.info("shutting down", extra={"kv": {"signal": signal.Signals(received).name}})
    server.shutdown()
    return EXIT_OK


def _fingerprint(config: Config) -> int:
    """The privileged command, in its own unit: never part of serve, check or textfile."""
    from sops_nix_exporter import fingerprint

    try:
        result = fingerprint.run(config)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(f"sops-nix-exporter: cannot fingerprint into {config.fingerprint_dir}: {reason}\n")
        return EXIT_PROBLEM
    for error in result.errors:
        log.error("fingerprint failed", extra={"kv": {"where": error}})
    log.info("fingerprinted", extra={"kv": {"written": result.written, "kept": result.kept,
                                             "removed": result.removed, "errors": len(result.errors)}})  # fmt: skip
    return EXIT_PROBLEM if result.errors else EXIT_OK


def _prune(args: argparse.Namespace, config: Config) -> int:
    """The other privileged command, in its own unit: never part of serve, check or textfile."""
    from sops_nix_exporter import prune

    try:
        outcome = prune.run(config, apply=args.apply, min_age=args.min_age, lock_file=args.lock_file)
    except prune.Busy:
        sys.stderr.write(f"sops-nix-exporter: another prune is running (it holds {args.lock_file})\n")
        return EXIT_PROBLEM
    except OSError as exc:
        sys.stderr.write(f"sops-nix-exporter: prune failed: {exc.strerror or exc}\n")
        return EXIT_PROBLEM
    for failure in outcome.failed:
        log.error("prune left a generation", extra={"kv": {"what": failure}})
    return EXIT_PROBLEM if outcome.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup(args.log_level, args.log_format)
    config = _load(args)
    if args.command == "serve":
        return _serve(args, config)
    if args.command == "fingerprint":
        return _fingerprint(config)
    if args.command == "prune":
        return _prune(args, config)
    exporter, registry = app.build(config, process_metrics=False)
    if args.command == "check":
        # The report on stdout is the one place each finding is told; stderr keeps the run's own errors
        # (and debug lines when asked for).
        exporter.problem_log = None
        text, code = report(exporter.collect())
        sys.stdout.write(text)
        return code
    try:
        write_atomically(args.output, registry)
    except OSError as exc:
        sys.stderr.write(f"sops-nix-exporter: cannot write {args.output}: {exc.strerror}\n")
        return EXIT_PROBLEM
    return EXIT_OK
