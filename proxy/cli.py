"""Command-line parsing only: each subcommand calls one function of the package.

Each subcommand imports what it uses when it runs (trio, loguru, the proxy itself): `--help`, `check`
and `import` start in a fraction of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy import config
from proxy.config import Address, ConfigError, ProxyConfig, Settings, parse_address

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def default_config_path() -> str:
    """$DEVPROXY_CONFIG when set (a container names its mounted file there), else ./settings.toml."""
    return os.environ.get("DEVPROXY_CONFIG") or "settings.toml"


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devproxy", description="Share serial and TCP devices between clients.")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    for name, help_text in (("run", "run the proxy in the foreground"), ("check", "validate the config")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "-c",
            "--config",
            default=None,
            help="settings file (default: $DEVPROXY_CONFIG or ./settings.toml)",
        )

    simulate = commands.add_parser("simulate", help="run a simulated device on a pty or a TCP port")
    simulate.add_argument("protocol", choices=config.SIMULATED_PROTOCOLS)
    where = simulate.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", metavar="LINK", type=Path, help="make a pseudo-terminal; LINK becomes a symlink to it")
    where.add_argument("--listen", metavar="HOST:PORT", type=_address, help="accept hosts on this TCP address")
    simulate.add_argument("--delay", type=float, default=0.0, metavar="S", help="seconds before each answer")
    simulate.add_argument("--nak-every", type=int, default=0, metavar="N", help="NAK every Nth frame")
    simulate.add_argument("--drop-every", type=int, default=0, metavar="N", help="never answer every Nth frame")
    simulate.add_argument("--busy", action="store_true", help="answer every command with the busy error")
    simulate.add_argument(
        "--reaction-time", type=float, default=None, metavar="S", help="iec61107: least time before an answer (0.2)"
    )

    send = commands.add_parser("send", help="send one request in a device's protocol and print the answer")
    send.add_argument("address", metavar="HOST:PORT", type=_address)
    send.add_argument("--protocol", required=True, choices=config.SIMULATED_PROTOCOLS)
    send.add_argument("--hex", help="the request frame as hex bytes, sent as it is")
    send.add_argument("--command", help="custom: beep, status, read-vat; shtrih: short-status; energomera-ce: 0120")
    send.add_argument("--password", type=int, help="the device's password (each protocol has its default)")
    send.add_argument("--keys", help="dle: key codes, e.g. 1,2,75; coges: keys, e.g. ENT,2,9")
    send.add_argument("--id", type=int, default=1, help="dle: the register's node ID (default 1)")
    send.add_argument("--num", type=int, default=1, help="dle: the message number NUM (default 1)")
    send.add_argument("--price", type=int, help="coges: set a price")
    send.add_argument("--manager-code", help="coges: a 4- or 8-digit manager code")
    send.add_argument("--address", dest="meter_address", help="energomera-ce: the meter's address; iec61107: its ID")
    send.add_argument("--read", metavar="NAME", help="iec61107: the parameter to read, e.g. VOLTA")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the whole answer")
    importer = commands.add_parser("import", help="convert another gateway's configuration to settings.toml")
    importer.add_argument("kind", choices=("ecrservice", "cencn"), help="the gateway the file comes from")
    importer.add_argument("file", type=Path)
    importer.add_argument("-o", "--output", type=Path, default=Path("settings.toml"), help="default ./settings.toml")
    importer.add_argument("--force", action="store_true", help="overwrite the output file if it exists")

    devices = commands.add_parser("devices", help="the registry of dial-in devices")
    devices.add_argument("-c", "--config", default=None, help="settings file with the [dialin] table")
    actions = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every registered device")
    listing.add_argument("--json", action="store_true")
    add = actions.add_parser("add", help="register a device")
    add.add_argument("id")
    add.add_argument("--port", type=int, help="its direct port (default: the lowest free one)")
    add.add_argument("--name", default="", help="a name for the status page")
    remove = actions.add_parser("remove", help="forget a device")
    remove.add_argument("id")
    from_export = actions.add_parser("import", help="register the devices of a CE NetConnection export (CSV or XLSX)")
    from_export.add_argument("file", type=Path)

    status = commands.add_parser("status", help="the device table of a running proxy")
    status.add_argument("--url", help="the status server (default: [proxy] status of the config, or 127.0.0.1:8600)")
    status.add_argument("--json", action="store_true", help="print the JSON the API returns")
    status.add_argument("--token", help="bearer token (default: $DEVPROXY_STATUS_TOKEN, or the config's)")
    status.add_argument("-c", "--config", default=None, help="settings file to take the address and token from")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.subcommand == "run":
        return run(args.config or default_config_path())
    if args.subcommand == "check":
        return check(args.config or default_config_path())
    if args.subcommand == "simulate":
        return simulate(args)
    if args.subcommand == "status":
        return status(args)
    if args.subcommand == "import":
        return import_config(args)
    if args.subcommand == "devices":
        return devices(args)
    return send(args)


def _load(path: str) -> Settings | None:
    try:
        return config.load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def check(path: str) -> int:
    """Validates the config and prints what `run` would start."""
    settings = _load(path)
    if settings is None:
        return EXIT_CONFIG
    print(f"{path}: OK, {len(settings.devices)} device(s)")
    for device in settings.devices:
        line = (
            f"{device.line_baudrate} {device.bytesize}{device.parity}{device.stopbits:g}"
            if device.type == "serial"
            else ""
        )
        if device.switches_baud:
            line += " at sign-on, then the rate each session agrees"
        print(f"  {device.name}: {device.type} {device.describe()} {line}".rstrip())
        listen = ", ".join(map(str, device.listen))
        print(f"    protocol {device.protocol}, {device.sharing} sharing, clients on {listen}")
    if settings.proxy.status is not None:
        print(f"  status page on {settings.proxy.status}")
    if settings.dialin is not None:
        dialin = settings.dialin
        listen = ", ".join(map(str, dialin.listen))
        ports = "chosen by the system" if dialin.direct_ports is None else "{}-{}".format(*dialin.direct_ports)
        print(f"  dial-in devices connect on {listen}, identify by {dialin.identify}, direct ports {ports}")
        print(f"    registry {dialin.registry}, protocol {dialin.protocol}, {dialin.sharing} sharing")
    return EXIT_OK


def run(path: str) -> int:
    """The proxy in the foreground until SIGINT or SIGTERM; 2 when the config or a port is unusable."""
    import trio
    from loguru import logger

    from proxy import log
    from proxy.app import BindError, Running, serve

    settings = _load(path)
    if settings is None:
        return EXIT_CONFIG
    try:
        log.setup(settings.proxy)
    except log.LogFileError as exc:
        logger.error("{}; nothing was started", exc)
        return EXIT_CONFIG
    logger.info("devproxy starting with {}", path)

    async def reload(running: Running) -> None:
        try:
            # Off the event loop: a slow disk must not hold the devices up.
            new_settings = await trio.to_thread.run_sync(config.load, path)
        except ConfigError as exc:
            logger.error("SIGHUP: the new settings are not used, the running ones stay:\n{}", exc)
            return
        logger.info("SIGHUP: reloading {}", path)
        try:
            await running.reload(new_settings)
        except Exception:
            # A reload that fails must not stop what runs: the devices it did not reach keep going.
            logger.exception("SIGHUP: the reload failed part way; the proxy keeps running")

    try:
        _run_until_signal(lambda task_status: serve(settings, task_status=task_status), on_hangup=reload)
    except BindError as exc:
        logger.error("{}; nothing was started", exc)
        return EXIT_CONFIG
    logger.info("devproxy stopped")
    return EXIT_OK


def simulate(args: argparse.Namespace) -> int:
    """A simulated device until SIGINT or SIGTERM."""
    from proxy import log
    from proxy.simulators import serve_pty, serve_tcp
    from proxy.simulators.base import Faults

    faults = Faults(args.delay, args.nak_every, args.drop_every, args.busy, args.reaction_time)
    log.setup(ProxyConfig())
    if args.pty is not None:
        _run_until_signal(lambda task_status: serve_pty(args.protocol, args.pty, faults, task_status=task_status))
    else:
        _run_until_signal(lambda task_status: serve_tcp(args.protocol, args.listen, faults, task_status=task_status))
    return EXIT_OK


def send(args: argparse.Namespace) -> int:
    """One exchange with a device; prints what was sent and the answer, exit 1 with the reason on failure."""
    import trio

    from proxy.send import SendError, exchange

    try:
        lines = trio.run(exchange, args.address, args.protocol, args)
    except SendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK


def devices(args: argparse.Namespace) -> int:
    """The registry of dial-in devices: list, add, remove, import; exit 1 with the reason on failure."""
    from proxy.dialin import devices as registry_commands
    from proxy.dialin.registry import Registry, RegistryError

    settings = _load(args.config or default_config_path())
    if settings is None:
        return EXIT_CONFIG
    if settings.dialin is None:
        print(f"error: {settings.source} has no [dialin] table: there is no registry", file=sys.stderr)
        return EXIT_CONFIG
    try:
        registry = Registry(settings.dialin.registry, settings.dialin.direct_ports, lock_wait=0.5)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.action == "list":
            records = registry.all()
            rows = [registry_commands.as_row(record) for record in records]
            print(json.dumps(rows, indent=1) if args.json else registry_commands.table(records))
        elif args.action == "add":
            record = registry.add(args.id, args.port, args.name)
            print(f"added {record.id} with direct port {record.direct_port}")
        elif args.action == "remove":
            if not registry.remove(args.id):
                print(f"error: {args.id} is not registered", file=sys.stderr)
                return EXIT_FAILED
            print(f"removed {args.id}")
        else:
            added, skipped = registry_commands.import_export(registry, args.file)
            for line in added:
                print(f"added {line}")
            for line in skipped:
                print(f"skipped {line}")
            print(f"{len(added)} added, {len(skipped)} skipped")
    except (RegistryError, registry_commands.ImportFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        registry.close()
    return EXIT_OK


def import_config(args: argparse.Namespace) -> int:
    """Writes settings.toml from another gateway's file; lists on stderr what could not be mapped."""
    from proxy.importers import ImportFailed, import_cencn, import_ecrservice

    if args.output.exists() and not args.force:
        print(f"error: {args.output} exists; use --force to overwrite it or -o for another file", file=sys.stderr)
        return EXIT_FAILED
    try:
        imported = (import_ecrservice if args.kind == "ecrservice" else import_cencn)(args.file)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    args.output.write_text(imported.toml(), encoding="utf-8")
    what = f"{len(imported.settings['device'])} device(s)" if "device" in imported.settings else "a [dialin] table"
    print(f"wrote {args.output} with {what} from {args.file}")
    for line in imported.unmapped:
        print(f"not mapped: {line}", file=sys.stderr)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """Prints the device table of a running proxy; exit 1 with the reason when it cannot be read."""
    from proxy.status.client import StatusError, fetch, table

    url, token = args.url, args.token or os.environ.get("DEVPROXY_STATUS_TOKEN", "")
    path = args.config or default_config_path()
    if url is None or not token:
        try:
            proxy_config = config.load(path).proxy
        except ConfigError:
            proxy_config = ProxyConfig()
        if url is None:
            address = proxy_config.status or Address("127.0.0.1", 8600)
            url = f"http://{address}"
        token = token or proxy_config.status_token
    try:
        devices = fetch(url if "://" in url else f"http://{url}", token)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(devices, indent=1) if args.json else table(devices))
    return EXIT_OK


def _run_until_signal(
    start: Callable[..., Awaitable[object]], on_hangup: Callable[[Any], Awaitable[None]] | None = None
) -> None:
    """Runs `start` (a task that reports readiness) until SIGINT or SIGTERM, then cancels it cleanly.

    With `on_hangup`, SIGHUP calls it with what `start` reported.
    """
    import trio
    from loguru import logger

    wanted = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if on_hangup else ()))

    async def main() -> None:
        with trio.open_signal_receiver(*wanted) as signals:
            # Containment lives inside `start` (app.serve): what reaches this nursery ends the program.
            async with trio.open_nursery() as nursery:
                ready = await nursery.start(start)
                if isinstance(ready, str):
                    print(ready, flush=True)
                async for signum in signals:
                    if signum == signal.SIGHUP and on_hangup is not None:
                        await on_hangup(ready)
                        continue
                    logger.info("{}: closing clients and devices", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # nursery.start raises a task's error before it was ready as a group of one; unwrap it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
