"""Scripted faults: which request a simulated device mishandles, and how.

A script is a list of faults. Each matches requests (by command code, IEC 61107 command and data name,
COGES payload, or a byte pattern) and fires on the Nth match only (`nth`), on every match (`every =
true`, the default), or on every Nth match (`every = N`). Each fault counts its own matches, whether or
not it fires; when several fire on one request, the first in the script wins. A fault that fires
replaces the global knobs (Faults) for that request.

The TOML form (`devproxy simulate PROTOCOL --script FILE`)::

    [[fault]]
    match = { command = 0x13 }      # or { bytes = "01 05" }, { command = "R1", name = "VOLTA" }, ...
    nth = 3                         # or every = true (the default), or every = 2
    action = "error"
    code = 3505

Actions and their keys:

  error    the protocol's error answer with `code` (its busy answer when `code` is left out)
  delay    `seconds` more before = "answer" (the default: the ACK at once) or before = "ack" (everything)
  silence  the ACK and then nothing (no ACK either where the protocol has none)
  nak      the protocol's NAK instead of an answer (protocols with a NAK only)
  corrupt  the answer with a wrong checksum
  cut      the answer cut `after` K bytes (0: none of it), the rest never sent
  drop     `after` K bytes of the answer the link is dropped: a TCP connection is closed, a pty is
           hung up and made anew at the same link
  offline  no answer to this request, nor to anything for `seconds` (new TCP connections included)

Match keys (all those given must match): `command` (an integer: Custom, Shtrih, ATOL v2 and v3, DLE
message code, Energomera CE; a string for IEC 61107: "/?" sign-on, "ACK" option select, or a block's
code such as "R1", "P1", "B0"; also a one-character string for DLE), `name` (IEC 61107: the data name
of a block, "VOLTA"), `payload` (COGES: the payload starts with it), `bytes` (hex: the request's raw
bytes contain it). No match table: every request.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

ACTIONS = ("error", "delay", "silence", "nak", "corrupt", "cut", "drop", "offline")
BEFORE = ("answer", "ack")
MATCH_KEYS = ("command", "name", "payload", "bytes")
FAULT_KEYS = ("match", "nth", "every", "action", "code", "seconds", "before", "after")
# Keys each action takes beyond match/nth/every.
ACTION_KEYS = {
    "error": ("code",),
    "delay": ("seconds", "before"),
    "silence": (),
    "nak": (),
    "corrupt": (),
    "cut": ("after",),
    "drop": ("after",),
    "offline": ("seconds",),
}
MAX_FILE_SIZE = 1024 * 1024


class ScriptError(ValueError):
    """A fault script that cannot be used; str() is one line naming the file (if any) and the key."""


@attrs.frozen
class Fault:
    """One scripted fault. `pattern` is the raw byte pattern (the TOML `bytes` key)."""

    action: str
    command: int | str | None = None
    name: str | None = None
    payload: str | None = None
    pattern: bytes | None = None
    nth: int | None = None
    every: int = 1
    code: int | None = None
    seconds: float = 0.0
    before: str = "answer"
    after: int = 0

    def __attrs_post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ScriptError(problem)

    def fires(self, count: int) -> bool:
        """Whether the fault fires on its `count`th match (1-based)."""
        return count == self.nth if self.nth is not None else count % self.every == 0


def _problem(fault: Fault) -> str | None:
    if fault.action not in ACTIONS:
        return f"key 'action': {fault.action!r} is not one of {', '.join(ACTIONS)}"
    if fault.nth is not None and (not isinstance(fault.nth, int) or fault.nth < 1):
        return f"key 'nth': {fault.nth!r} is not a whole number from 1"
    if not isinstance(fault.every, int) or fault.every < 1:
        return f"key 'every': {fault.every!r} is not true or a whole number from 1"
    if fault.before not in BEFORE:
        return f"key 'before': {fault.before!r} is not one of {', '.join(BEFORE)}"
    if not isinstance(fault.seconds, int | float) or not math.isfinite(fault.seconds) or fault.seconds < 0:
        return f"key 'seconds': {fault.seconds!r} is not a number of seconds from 0"
    if fault.action in ("delay", "offline") and fault.seconds <= 0:
        return f"key 'seconds': action {fault.action!r} needs seconds above 0"
    if not isinstance(fault.after, int) or fault.after < 0:
        return f"key 'after': {fault.after!r} is not a whole number of bytes from 0"
    if fault.code is not None and not isinstance(fault.code, int):
        return f"key 'code': {fault.code!r} is not an integer"
    if fault.command is not None and not isinstance(fault.command, int | str):
        return f"key 'match.command': {fault.command!r} is not an integer or a string"
    return None


@attrs.frozen
class FaultScript:
    """The faults of one device, in the order they are tried; `source` names their file for messages."""

    faults: tuple[Fault, ...] = attrs.field(converter=tuple, factory=tuple)
    source: str = "<script>"

    def check(self, protocol: str) -> None:
        """ScriptError when a fault cannot apply to `protocol` (a match key or an action it lacks)."""
        from proxy.simulators import model_factory

        device = model_factory(protocol)
        for index, fault in enumerate(self.faults, 1):
            problem = device.script_problem(fault)
            if problem is not None:
                raise ScriptError(f"{self.source}: [[fault]] {index}: {problem} ({protocol})")


ScriptLike = FaultScript | Sequence[Fault]


def as_script(script: ScriptLike | None) -> FaultScript | None:
    if script is None or isinstance(script, FaultScript):
        return script
    return FaultScript(tuple(script))


def load_script(path: Path | str) -> FaultScript:
    """The script in a TOML file; ScriptError (one line, naming the file and key) when it is not usable."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise ScriptError(f"{path}: is not a regular file: not a fault script")
        if path.stat().st_size > MAX_FILE_SIZE:
            raise ScriptError(f"{path}: is larger than {MAX_FILE_SIZE} bytes: not a fault script")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_script(text, str(path))


def parse_script(text: str, source: str = "<script>") -> FaultScript:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScriptError(f"{source}: not TOML: {exc}") from None
    except RecursionError:
        raise ScriptError(f"{source}: nested too deeply: not a fault script") from None
    unknown = sorted(set(raw) - {"fault"})
    if unknown:
        raise ScriptError(f"{source}: unknown key {unknown[0]!r} (a script holds [[fault]] tables)")
    tables = raw.get("fault", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ScriptError(f"{source}: 'fault' must be [[fault]] tables")
    faults = []
    for index, table in enumerate(tables, 1):
        try:
            faults.append(_fault(table))
        except ScriptError as exc:
            raise ScriptError(f"{source}: [[fault]] {index}: {exc}") from None
    return FaultScript(tuple(faults), source)


def _fault(table: dict[str, Any]) -> Fault:
    unknown = sorted(set(table) - set(FAULT_KEYS))
    if unknown:
        raise ScriptError(f"unknown key {unknown[0]!r} (keys: {', '.join(FAULT_KEYS)})")
    if "action" not in table:
        raise ScriptError(f"key 'action' is missing (one of {', '.join(ACTIONS)})")
    action = table["action"]
    if action not in ACTIONS:
        raise ScriptError(f"key 'action': {action!r} is not one of {', '.join(ACTIONS)}")
    for key in ("code", "seconds", "before", "after"):
        if key in table and key not in ACTION_KEYS[action]:
            raise ScriptError(f"key {key!r} does not apply to action {action!r}")
    if "nth" in table and "every" in table:
        raise ScriptError("keys 'nth' and 'every' exclude each other")
    every = table.get("every", True)
    if every is True:
        every = 1
    elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ScriptError(f"key 'every': {every!r} is not true or a whole number from 1")
    nth = table.get("nth")
    if nth is not None and (isinstance(nth, bool) or not isinstance(nth, int) or nth < 1):
        raise ScriptError(f"key 'nth': {nth!r} is not a whole number from 1")
    match = table.get("match", {})
    if not isinstance(match, dict):
        raise ScriptError("key 'match': must be a table, e.g. { command = 0x13 } or { bytes = \"01 05\" }")
    unknown = sorted(set(match) - set(MATCH_KEYS))
    if unknown:
        raise ScriptError(f"unknown key 'match.{unknown[0]}' (keys: {', '.join(MATCH_KEYS)})")
    command = match.get("command")
    if command is not None and (isinstance(command, bool) or not isinstance(command, int | str)):
        raise ScriptError(f"key 'match.command': {command!r} is not an integer or a string")
    for key in ("name", "payload"):
        if key in match and not isinstance(match[key], str):
            raise ScriptError(f"key 'match.{key}': {match[key]!r} is not a string")
    pattern = None
    if "bytes" in match:
        try:
            pattern = bytes.fromhex(match["bytes"])
        except (TypeError, ValueError):
            raise ScriptError(f"key 'match.bytes': {match['bytes']!r} is not hex bytes like \"01 05\"") from None
        if not pattern:
            raise ScriptError("key 'match.bytes': is empty")
    seconds = table.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ScriptError(f"key 'seconds': {seconds!r} is not a number")
    for key in ("code", "after"):
        if key in table and (isinstance(table[key], bool) or not isinstance(table[key], int)):
            raise ScriptError(f"key {key!r}: {table[key]!r} is not an integer")
    if action in ("delay", "offline") and "seconds" not in table:
        raise ScriptError(f"key 'seconds' is missing (action {action!r} needs it)")
    return Fault(
        action,
        command=command,
        name=match.get("name"),
        payload=match.get("payload"),
        pattern=pattern,
        nth=nth,
        every=every,
        code=table.get("code"),
        seconds=float(seconds),
        before=table.get("before", "answer"),
        after=table.get("after", 0),
    )


class ScriptRun:
    """A script's state while it runs: each fault's match count and when an offline spell ends.

    One run is shared by every connection to one simulated device (serve_tcp gives each connection a
    model of its own): counts go on across connections, and an offline device is offline to all.
    """

    def __init__(self, script: ScriptLike) -> None:
        self.script = as_script(script) or FaultScript()
        self.counts = [0] * len(self.script.faults)
        self.offline_until = -math.inf

    def fault_for(self, matches: Sequence[bool]) -> Fault | None:
        """Counts the faults that match a request; the first that fires, or None."""
        chosen = None
        for index, (fault, matched) in enumerate(zip(self.script.faults, matches, strict=True)):
            if matched:
                self.counts[index] += 1
                if chosen is None and fault.fires(self.counts[index]):
                    chosen = fault
        return chosen

    def offline(self, now: float) -> bool:
        return now < self.offline_until

    def go_offline(self, now: float, seconds: float) -> None:
        self.offline_until = max(self.offline_until, now + seconds)


def as_run(script: ScriptLike | ScriptRun | None) -> ScriptRun | None:
    if script is None or isinstance(script, ScriptRun):
        return script
    return ScriptRun(script)
