"""Command-line parsing only: each subcommand calls one function of the package.

Each subcommand imports what it uses when it runs (trio, loguru, the proxy itself): `--help`, `check`
and `import` start in a fraction of the time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from proxy import config
from proxy.config import Address, ConfigError, DialinConfig, ProxyConfig, Settings, parse_address

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# send: the exchange worked and the device answered with an error of its own (busy, wrong password).
EXIT_DEVICE = 3
# What a shell reports for a program that SIGINT or SIGPIPE ended: 128 + the signal's number.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE
USES_CONFIG = ("run", "check", "status", "devices")
# `simulate replay FILE`: a recording served as a device, in place of a protocol's simulator.
REPLAY = "replay"
CONFIG_HELP = "settings file (default: $DEVPROXY_CONFIG, else ./settings.toml)"
EPILOG = """\
-c PATH may come before or after the command and its action (devproxy devices list -c PATH).

exit codes:
  0    done
  1    failed: a device, proxy, registry or file could not be reached, read or written
  2    a config or usage error: nothing was done
  3    send: the device answered with an error of its own (busy, wrong password)
  130  interrupted (Ctrl-C); run and simulate stop cleanly on Ctrl-C and exit 0
  141  the reader closed the pipe (devproxy status | head -3): the rest is not written

examples:
  devproxy check -c settings.toml
  devproxy send 127.0.0.1:8000 --protocol custom --command beep
  devproxy COMMAND --help"""


def default_config_path() -> str:
    """$DEVPROXY_CONFIG when set (a container names its mounted file there), else ./settings.toml."""
    return os.environ.get("DEVPROXY_CONFIG") or "settings.toml"


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0: never)")
    return value


def _byte(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 0xFF:
        raise argparse.ArgumentTypeError(f"{value} is not in 0-255")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line that names --help, instead of a usage block and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """--version: the installed package's version, read from its metadata only when asked.

    Importing importlib.metadata takes longer than all the rest of `devproxy --help`.
    """

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("devproxy")
        except PackageNotFoundError:
            text = "(not installed: run `pip install -e .` for its version)"
        try:
            print(f"devproxy {text}")
            sys.stdout.flush()
        except BrokenPipeError:
            # As main() does for the commands: a reader that closed the pipe ends it quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            parser.exit(EXIT_CLOSED_PIPE)
        parser.exit(EXIT_OK)


def _command(
    group: argparse._SubParsersAction, name: str, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and examples as written (wrapped by hand)."""
    return group.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: argparse copies a subcommand's defaults over what the parser before it read, so a
    # default here would erase `devproxy -c X devices list`'s X; unset, the top level's None stays.
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH", help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="devproxy",
        description="Share serial and TCP devices (fiscal registers, meters, payment systems) between clients.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    parser.add_argument("-c", "--config", default=None, metavar="PATH", help=f"{CONFIG_HELP}; also after COMMAND")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    run = _command(
        commands,
        "run",
        "run the proxy in the foreground",
        "Runs the proxy in the foreground until SIGINT (Ctrl-C) or SIGTERM, which close clients and links\n"
        "and exit 0; SIGHUP reloads the settings. A config error or a port that cannot be bound exits 2\n"
        "before anything is served.",
        "  devproxy run\n  devproxy run -c /etc/devproxy/settings.toml",
    )
    _add_config_option(run)
    check = _command(
        commands,
        "check",
        "validate the config",
        "Validates the settings and prints what `run` would start: exit 0, or 2 with every problem,\n"
        "each naming its table, key and value.",
        "  devproxy check -c settings.toml",
    )
    _add_config_option(check)

    simulate = _command(
        commands,
        "simulate",
        "run a simulated device on a pty or a TCP port",
        "A simulated device until SIGINT or SIGTERM: on a new pseudo-terminal (LINK becomes a symlink\n"
        "to it), or on a TCP port with a device of its own for each connection (port 0 picks a free\n"
        "port and prints it). The fault options make it slow, NAK, drop answers or answer busy;\n"
        "--script FILE scripts faults per request (a TOML file of [[fault]] tables, see the README).\n"
        "`replay FILE` serves a recording made with `record` (a [[device]] key): each request gets the\n"
        "recorded answer to the same bytes, or with --in-order the recorded answers in their order.",
        "  devproxy simulate custom --pty /tmp/ttyFPTR\n"
        "  devproxy simulate shtrih --listen 127.0.0.1:0 --delay 2 --busy\n"
        "  devproxy simulate custom --pty /tmp/ttyFPTR --script faults.toml\n"
        "  devproxy simulate replay fptr1.jsonl --pty /tmp/ttyFPTR --timing recorded",
    )
    simulate.add_argument("protocol", choices=(*config.SIMULATED_PROTOCOLS, REPLAY))
    simulate.add_argument("recording", nargs="?", type=Path, metavar="FILE", help="replay: the recording")
    where = simulate.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", metavar="LINK", type=Path, help="make a pseudo-terminal; LINK becomes a symlink to it")
    where.add_argument("--listen", metavar="HOST:PORT", type=_address, help="accept hosts on this TCP address")
    simulate.add_argument("--delay", type=_seconds, default=0.0, metavar="S", help="seconds before each answer")
    simulate.add_argument("--nak-every", type=_count, default=0, metavar="N", help="NAK every Nth frame")
    simulate.add_argument("--drop-every", type=_count, default=0, metavar="N", help="never answer every Nth frame")
    simulate.add_argument("--busy", action="store_true", help="answer every command with the busy error")
    simulate.add_argument(
        "--reaction-time", type=_seconds, default=None, metavar="S", help="iec61107: least time before an answer (0.2)"
    )
    simulate.add_argument(
        "--script", type=Path, default=None, metavar="FILE", help="scripted faults: a TOML file of [[fault]] tables"
    )
    simulate.add_argument(
        "--in-order", action="store_true", help="replay: the recorded answers in recorded order, whatever is asked"
    )
    simulate.add_argument(
        "--timing",
        choices=("none", "recorded"),
        default="none",
        help="replay: answer at once (none, the default) or after the recorded times (recorded)",
    )

    send = _command(
        commands,
        "send",
        "send one request in a device's protocol and print the answer",
        "Plays one exchange in a device's protocol, through the proxy or straight to the device, and\n"
        "prints each step as it happens and the decoded answer. Exit 0: the device answered OK; 1: the\n"
        "exchange failed (no connection, timeout, NAK, bad checksum, connection closed); 2: the options\n"
        "make no request of the protocol (the error names the choices); 3: the device answered with an\n"
        "error of its own (busy, wrong password), decoded where the protocol says how.",
        "  devproxy send 127.0.0.1:8000 --protocol custom --command beep\n"
        "  devproxy send 127.0.0.1:8001 --protocol shtrih --password 30\n"
        "  devproxy send 127.0.0.1:8002 --protocol energomera-ce --command 0120 --address 46950\n"
        "  devproxy send 127.0.0.1:8003 --protocol iec61107 --read VOLTA\n"
        "  devproxy send 127.0.0.1:8000 --protocol custom --hex '01 05 00 13 3f 42 0f 00 a8'",
    )
    send.add_argument("address", metavar="HOST:PORT", type=_address)
    send.add_argument("--protocol", required=True, choices=config.SIMULATED_PROTOCOLS)
    send.add_argument("--hex", help="the request frame as hex bytes, sent as it is")
    send.add_argument("--command", help="custom: beep, status, read-vat; shtrih: short-status; energomera-ce: 0120")
    send.add_argument("--password", type=int, help="the device's password (each protocol has its default)")
    send.add_argument("--keys", help="dle: key codes, e.g. 1,2,75; coges: keys, e.g. ENT,2,9")
    send.add_argument("--id", type=_byte, default=1, help="dle: the register's node ID (default 1)")
    send.add_argument("--num", type=_byte, default=1, help="dle: the message number NUM (default 1)")
    send.add_argument("--price", type=int, help="coges: set a price")
    send.add_argument("--manager-code", help="coges: a 4- or 8-digit manager code")
    send.add_argument("--address", dest="meter_address", help="energomera-ce: the meter's address; iec61107: its ID")
    send.add_argument("--read", metavar="NAME", help="iec61107: the parameter to read, e.g. VOLTA")
    send.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the whole answer")

    connect = _command(
        commands,
        "connect",
        "a local virtual serial port joined to a device port",
        "A new pseudo-terminal (LINK becomes a symlink to it) joined to a device port over TCP, for a\n"
        "program that only knows a serial port; it connects again when the connection drops. With\n"
        "--rfc2217 the port must be a listen_rfc2217 port (or another RFC 2217 server): the rate, stop\n"
        "bits and flow control the program sets on the pty are sent to the remote port as it changes\n"
        "them (a pty keeps no data size, parity or modem lines: those stay as the remote port has them).\n"
        "Runs until Ctrl-C (exit 130) or SIGTERM (exit 0); the link is removed either way.",
        "  devproxy connect 192.168.1.10:8000 --pty /tmp/ttyFPTR\n"
        "  devproxy connect 192.168.1.10:8100 --pty /tmp/ttyMETER --rfc2217",
    )
    connect.add_argument("address", metavar="HOST:PORT", type=_address)
    connect.add_argument("--pty", metavar="LINK", type=Path, required=True, help="LINK becomes a symlink to the pty")
    connect.add_argument("--rfc2217", action="store_true", help="speak RFC 2217 and send the pty's line settings")

    importer = _command(
        commands,
        "import",
        "convert another gateway's configuration to settings.toml",
        "Converts ECRService's config.xml or CENCn's appsettings.json to settings.toml, and lists on\n"
        "stderr every setting it cannot map, with the reason. It never overwrites a file without --force;\n"
        "-o - writes to stdout.",
        "  devproxy import ecrservice 'C:\\ProgramData\\ECRService\\config.xml' -o settings.toml\n"
        "  devproxy import cencn appsettings.json -o -",
    )
    importer.add_argument("kind", choices=("ecrservice", "cencn"), help="the gateway the file comes from")
    importer.add_argument("file", type=Path)
    importer.add_argument(
        "-o", "--output", default="settings.toml", metavar="PATH", help="default ./settings.toml; - for stdout"
    )
    importer.add_argument("--force", action="store_true", help="overwrite the output file if it exists")

    devices = _command(
        commands,
        "devices",
        "the registry of dial-in devices",
        "The registry of dial-in devices, the file [dialin] registry names. It works while the proxy is\n"
        "stopped: a running proxy holds the registry, and devices then register as they connect. A\n"
        "PostgreSQL registry (a postgresql:// URL) can be changed at any time.",
        "  devproxy devices list -c settings.toml\n  devproxy devices -c settings.toml add 009210 --name 'Meter 1'",
    )
    _add_config_option(devices)
    actions = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _command(
        actions,
        "list",
        "every registered device",
        "Every registered device with its direct port, when it was last seen and from where; --json\n"
        "prints every field the registry keeps.",
        "  devproxy devices list\n  devproxy devices list --json -c settings.toml",
    )
    listing.add_argument("--json", action="store_true", help="print the devices as JSON")
    add = _command(
        actions,
        "add",
        "register a device",
        "Registers a device ID with a direct port, where clients reach it once it dials in.",
        "  devproxy devices add 009210\n  devproxy devices add 009210 --port 7510 --name 'Meter 1'",
    )
    add.add_argument("id")
    add.add_argument("--port", type=int, help="its direct port (default: the lowest free one)")
    add.add_argument("--name", default="", help="a name for the status page")
    remove = _command(
        actions,
        "remove",
        "forget a device",
        "Forgets a registered device and frees its direct port.",
        "  devproxy devices remove 009210",
    )
    remove.add_argument("id")
    from_export = _command(
        actions,
        "import",
        "register the devices of a CE NetConnection export (CSV or XLSX)",
        "Registers the devices of a CE NetConnection 4.x export (CSV or XLSX) with their ports, and\n"
        "prints what it added and what it skipped and why.",
        "  devproxy devices import devices.xlsx -c settings.toml",
    )
    from_export.add_argument("file", type=Path)
    migrate = _command(
        actions,
        "migrate",
        "copy the SQLite registry into PostgreSQL",
        "Copies every device of the SQLite registry [dialin] registry names, with its direct port, into a\n"
        "PostgreSQL registry (created if need be), for several instances to share; then point [dialin]\n"
        "registry at the URL. Devices already there, or whose port another device has, are skipped and named.",
        "  devproxy devices migrate --to postgresql://devproxy@db.example/devproxy -c settings.toml",
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="the PostgreSQL registry (postgresql://...)")
    for action in (listing, add, remove, from_export, migrate):
        _add_config_option(action)

    status = _command(
        commands,
        "status",
        "the device table of a running proxy",
        "The device table of a running proxy, read from its status server: --url, else the config's\n"
        "[proxy] status, else 127.0.0.1:8600. Exit 1 with the reason when it cannot be read.",
        '  devproxy status\n  devproxy status --url 10.0.0.5:8600 --token "$TOKEN" --json',
    )
    status.add_argument("--url", help="the status server (default: [proxy] status of the config, or 127.0.0.1:8600)")
    status.add_argument("--json", action="store_true", help="print the JSON the API returns")
    status.add_argument("--token", help="bearer token (default: $DEVPROXY_STATUS_TOKEN, or the config's)")
    _add_config_option(status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The devproxy command; returns its exit code.

    Ctrl-C ends any command without a traceback (exit 130; run and simulate catch SIGINT themselves
    and stop cleanly, exit 0), and a reader that closes the pipe (`devproxy status | head -3`) ends it
    quietly, as it ends a Unix tool.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None and args.subcommand not in USES_CONFIG:
        commands = f"{', '.join(USES_CONFIG[:-1])} and {USES_CONFIG[-1]}"
        parser.error(f"-c/--config is for {commands}; {args.subcommand} takes no settings file")
    try:
        code = _dispatch(args)
        # Inside the try: a closed pipe often shows only when the buffered output is written.
        sys.stdout.flush()
    except BaseException as exc:
        if _only(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if _only(exc, BrokenPipeError):
            # Python flushes stdout again at exit, which would fail and complain: point it at nothing.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_CLOSED_PIPE
        raise
    return code


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """True when `exc` is a `kind`, or a group (as Trio raises) of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def _dispatch(args: argparse.Namespace) -> int:
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
    if args.subcommand == "connect":
        return connect(args)
    return send(args)


def _load(path: str) -> Settings | None:
    try:
        return config.load(path)
    except ConfigError as exc:
        # One problem is one line; several are listed under a line that counts them.
        print(f"{exc.source}: {exc.problems[0]}" if len(exc.problems) == 1 else exc, file=sys.stderr)
        return None


def check(path: str) -> int:
    """Validates the config and prints what `run` would start."""
    settings = _load(path)
    if settings is None:
        return EXIT_CONFIG
    print(f"{path}: OK, {len(settings.devices)} device(s)")
    from proxy import exposure

    for warning in exposure.warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    for device in settings.devices:
        line = (
            f"{device.line_baudrate} {device.bytesize}{device.parity}{device.stopbits:g}"
            if device.type == "serial"
            else ""
        )
        if device.switches_baud:
            line += " at sign-on, then the rate each session agrees"
        print(f"  {device.name}: {device.type} {device.describe()} {line}".rstrip())
        listen = f"clients on {', '.join(map(str, device.listen))}" if device.listen else "no plain port"
        print(f"    protocol {device.protocol}, {device.sharing} sharing, {listen}")
        if device.listen_tls:
            print(f"    TLS clients on {', '.join(map(str, device.listen_tls))}")
        if device.listen_rfc2217:
            print(f"    RFC 2217 clients on {', '.join(map(str, device.listen_rfc2217))}")
        if device.type == "serial":
            flow = ", ".join(name for name in ("rtscts", "xonxoff") if getattr(device, name)) or "no flow control"
            print(f"    {flow}, DTR {device.dtr}, RTS {device.rts}")
    if settings.proxy.status is not None:
        scheme = "https" if settings.proxy.status_tls else "http"
        print(f"  status page on {scheme}://{settings.proxy.status}/")
    if settings.dialin is not None:
        dialin = settings.dialin
        listen = ", ".join([*map(str, dialin.listen), *(f"{address} (TLS)" for address in dialin.listen_tls)])
        ports = "chosen by the system" if dialin.direct_ports is None else "{}-{}".format(*dialin.direct_ports)
        ports += " (TLS)" if dialin.direct_tls else " (RFC 2217)" if dialin.direct_rfc2217 else ""
        print(f"  dial-in devices connect on {listen}, identify by {dialin.identify}, direct ports {ports}")
        print(f"    registry {dialin.registry}, protocol {dialin.protocol}, {dialin.sharing} sharing")
        problems = _registry_problems(settings)
        if problems:
            print(f"{path}: the registry's direct ports do not fit these settings:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_CONFIG
    return EXIT_OK


def _registry_problems(settings: Settings) -> list[str]:
    """Registered devices whose direct port `run` could not open; none when there is no registry yet, or
    a running proxy holds it (which `check` then says)."""
    from proxy.dialin import devices as registry_commands
    from proxy.dialin.cluster import open_registry
    from proxy.dialin.postgres import is_postgres
    from proxy.dialin.registry import RegistryError

    assert settings.dialin is not None
    if not is_postgres(settings.dialin.registry) and not Path(settings.dialin.registry).exists():
        return []
    try:
        registry = open_registry(settings.dialin, lock_wait=0.5)
    except RegistryError as exc:
        print(f"  the registry's direct ports are not checked: {exc}")
        return []
    try:
        return registry_commands.misplaced(registry, settings.listener_ports())
    except RegistryError as exc:
        print(f"  the registry's direct ports are not checked: {exc}")
        return []
    finally:
        registry.close()


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
    """A simulated device until SIGINT or SIGTERM; 2, as `run`, when its pty link or port cannot be made."""
    from proxy import log
    from proxy.simulators import serve_pty, serve_tcp
    from proxy.simulators.base import Faults
    from proxy.simulators.script import ScriptError, load_script

    faults = Faults(args.delay, args.nak_every, args.drop_every, args.busy, args.reaction_time)
    if args.protocol == REPLAY or args.recording is not None:
        return _simulate_replay(args, faults)
    if args.in_order or args.timing != "none":
        print("error: --in-order and --timing are for `simulate replay FILE`", file=sys.stderr)
        return EXIT_CONFIG
    script = None
    if args.script is not None:
        try:
            script = load_script(args.script)
            script.check(args.protocol)
        except ScriptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    log.setup(ProxyConfig())
    try:
        if args.pty is not None:
            _run_until_signal(
                lambda task_status: serve_pty(args.protocol, args.pty, faults, script=script, task_status=task_status)
            )
        else:
            _run_until_signal(
                lambda task_status: serve_tcp(
                    args.protocol, args.listen, faults, script=script, task_status=task_status
                )
            )
    except BrokenPipeError:
        raise  # stdout, closed by its reader: main() ends quietly
    except OSError as exc:
        where = f"a pty linked as {args.pty}" if args.pty is not None else f"{args.listen}"
        print(f"error: cannot simulate a device on {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _simulate_replay(args: argparse.Namespace, faults: object) -> int:
    """`simulate replay FILE`: a recording served as a device; 2 for a bad file or options."""
    from proxy import log
    from proxy.recording import RecordingError, load_recording
    from proxy.simulators import serve_pty, serve_tcp
    from proxy.simulators.base import Faults
    from proxy.simulators.replay import ReplayDevice

    if args.protocol != REPLAY:
        print(f"error: FILE is for `simulate replay FILE`, not {args.protocol}", file=sys.stderr)
        return EXIT_CONFIG
    if args.recording is None:
        print("error: simulate replay needs the recording: devproxy simulate replay FILE --pty LINK", file=sys.stderr)
        return EXIT_CONFIG
    if faults != Faults() or args.script is not None:
        print("error: the fault options and --script are not for replay (it plays what was recorded)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        records = load_recording(args.recording)
    except RecordingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def model() -> ReplayDevice:
        return ReplayDevice(records, in_order=args.in_order, timing=args.timing)

    name = f"replay of {args.recording} ({len(records)} exchanges)"
    log.setup(ProxyConfig())
    try:
        if args.pty is not None:
            _run_until_signal(lambda task_status: serve_pty(name, args.pty, model=model, task_status=task_status))
        else:
            _run_until_signal(lambda task_status: serve_tcp(name, args.listen, model=model, task_status=task_status))
    except BrokenPipeError:
        raise
    except OSError as exc:
        where = f"a pty linked as {args.pty}" if args.pty is not None else f"{args.listen}"
        print(f"error: cannot simulate a device on {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def connect(args: argparse.Namespace) -> int:
    """A virtual serial port joined to a device port until SIGTERM (0) or Ctrl-C (130, from main());
    2 when the pty or its link cannot be made."""
    from proxy import connect as virtual_port
    from proxy import log

    log.setup(ProxyConfig())
    try:
        virtual_port.run(args.address, args.pty, rfc2217=args.rfc2217)
    except BrokenPipeError:
        raise  # stdout, closed by its reader: main() ends quietly
    except OSError as exc:
        print(f"error: cannot make a pty linked as {args.pty}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def send(args: argparse.Namespace) -> int:
    """One exchange with a device; prints each step as it happens, and on failure one line on stderr.

    Exit 1 when the exchange fails on the way, 2 when the options make no request of the protocol, 3
    when the device answers with an error of its own.
    """
    import trio

    from proxy.send import DeviceError, RequestError, SendError, exchange

    try:
        trio.run(exchange, args.address, args.protocol, args, lambda line: print(line, flush=True))
    except (RequestError, SendError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return {RequestError: EXIT_CONFIG, SendError: EXIT_FAILED, DeviceError: EXIT_DEVICE}[type(exc)]
    return EXIT_OK


def devices(args: argparse.Namespace) -> int:
    """The registry of dial-in devices: list, add, remove, import, migrate; exit 1 with the reason on failure."""
    from proxy.dialin import devices as registry_commands
    from proxy.dialin.cluster import open_registry
    from proxy.dialin.registry import RegistryError

    settings = _load(args.config or default_config_path())
    if settings is None:
        return EXIT_CONFIG
    if settings.dialin is None:
        print(f"error: {settings.source} has no [dialin] table: there is no registry", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "migrate":
        return _migrate(settings.dialin, args.to)
    try:
        registry = open_registry(settings.dialin, lock_wait=0.5)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.action == "list":
            records, holders = registry.all(), registry_commands.holders(registry)
            rows = [registry_commands.as_row(record, holders) for record in records]
            print(json.dumps(rows, indent=1) if args.json else registry_commands.table(records, holders))
        elif args.action == "add":
            record = registry_commands.add(registry, args.id, args.port, settings.listener_ports(), name=args.name)
            print(f"added {record.id} with direct port {record.direct_port}")
        elif args.action == "remove":
            if not registry.remove(args.id):
                print(f"error: {args.id} is not registered", file=sys.stderr)
                return EXIT_FAILED
            print(f"removed {args.id}")
        else:
            added, skipped = registry_commands.import_export(registry, args.file, settings.listener_ports())
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


def _migrate(dialin: DialinConfig, url: str) -> int:
    """`devices migrate`: the SQLite registry copied into PostgreSQL; exit 1 with the reason on failure."""
    from proxy.dialin import devices as registry_commands
    from proxy.dialin.postgres import PostgresRegistry, is_postgres
    from proxy.dialin.registry import Registry, RegistryError

    if is_postgres(dialin.registry):
        print("error: [dialin] registry is PostgreSQL already; migrate copies a SQLite file", file=sys.stderr)
        return EXIT_FAILED
    if not is_postgres(url):
        print(f"error: --to {url!r} is not a postgresql:// URL", file=sys.stderr)
        return EXIT_FAILED
    try:
        source = Registry(dialin.registry, dialin.direct_ports, lock_wait=0.5)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        target = PostgresRegistry(url, dialin.direct_ports)
        try:
            copied, skipped = registry_commands.migrate(source, target)
        finally:
            target.close()
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        source.close()
    for line in skipped:
        print(f"skipped {line}")
    print(f"{len(copied)} copied to {target.path}, {len(skipped)} skipped")
    return EXIT_OK if not skipped else EXIT_FAILED


def import_config(args: argparse.Namespace) -> int:
    """Writes settings.toml from another gateway's file; lists on stderr what could not be mapped.

    With `-o -` the settings go to stdout and everything else to stderr, so that they can be piped.
    """
    from proxy.importers import ImportFailed, import_cencn, import_ecrservice

    to_stdout = args.output == "-"
    output = Path(args.output)
    if not to_stdout and output.exists() and not args.force:
        print(f"error: {output} exists; use --force to overwrite it or -o for another file", file=sys.stderr)
        return EXIT_FAILED
    try:
        imported = (import_ecrservice if args.kind == "ecrservice" else import_cencn)(args.file)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    what = f"{len(imported.settings['device'])} device(s)" if "device" in imported.settings else "a [dialin] table"
    if to_stdout:
        sys.stdout.write(imported.toml())
        print(f"wrote {what} from {args.file} to stdout", file=sys.stderr)
    else:
        try:
            output.write_text(imported.toml(), encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"wrote {output} with {what} from {args.file}")
    for line in imported.unmapped:
        print(f"not mapped: {line}", file=sys.stderr)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """Prints the device table of a running proxy; exit 1 with the reason when it cannot be read."""
    from proxy.status.client import StatusError, fetch, table

    url, token = args.url, args.token or os.environ.get("DEVPROXY_STATUS_TOKEN", "")
    # A --url with no scheme takes the one the settings give the status server (https with status_tls_*).
    if url is None or not token or "://" not in url:
        if args.config is not None:
            # A file named on purpose must be right; the default one may well be absent here.
            settings = _load(args.config)
            if settings is None:
                return EXIT_CONFIG
            proxy_config = settings.proxy
        else:
            try:
                proxy_config = config.load(default_config_path()).proxy
            except ConfigError:
                proxy_config = ProxyConfig()
        scheme = "https" if proxy_config.status_tls else "http"
        if url is None:
            url = str(proxy_config.status or Address("127.0.0.1", 8600))
        if "://" not in url:
            url = f"{scheme}://{url}"
        token = token or proxy_config.status_token
    try:
        devices = fetch(url, token)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        # urllib's word on a malformed URL (an unclosed IPv6 bracket, say)
        print(f"error: --url {url!r} is not a URL: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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
