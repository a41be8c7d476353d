"""Whose line settings a device's serial port has: the configured ones, or those of the client that holds
it in session sharing (RFC 2217, proxy.telnet_stream), until its lease ends or a link reopens."""

from __future__ import annotations

import contextlib
import errno
import termios
from typing import TYPE_CHECKING

import attrs
from loguru import logger

from proxy.config import DeviceConfig

if TYPE_CHECKING:
    from proxy.device import Device
    from proxy.links.serial import SerialLink

# dtr and rts as configured: "keep" leaves the line as the port's open left it (None).
_MODEM_LINE = {"on": True, "off": False, "keep": None}
# A lease's first changes are logged at INFO, the rest at DEBUG: a client that floods requests must not
# flood the log.
LOGGED_CHANGES = 10


@attrs.frozen
class LineSettings:
    """A serial line's rate, framing, flow control, modem lines and break. dtr or rts None: as the port's
    open left it (on, for a Linux serial port)."""

    baudrate: int
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1.0
    rtscts: bool = False
    xonxoff: bool = False
    dtr: bool | None = None
    rts: bool | None = None
    break_on: bool = False

    @classmethod
    def configured(cls, config: DeviceConfig) -> LineSettings:
        """A device's settings.toml line settings (defaults for a device that is no serial port)."""
        return cls(
            baudrate=config.line_baudrate,
            bytesize=config.bytesize,
            parity=config.parity,
            stopbits=float(config.stopbits),
            rtscts=config.rtscts,
            xonxoff=config.xonxoff,
            dtr=_MODEM_LINE[config.dtr],
            rts=_MODEM_LINE[config.rts],
        )

    def framing_of(self, other: LineSettings) -> bool:
        """True when `other` has the same rate, framing and flow control (what termios holds)."""
        keys = ("baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    def describe(self) -> str:
        """'9600 7E1, rtscts, DTR off' for log lines."""
        parts = [f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits:g}"]
        parts += [name for name in ("rtscts", "xonxoff") if getattr(self, name)]
        for name in ("dtr", "rts"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name.upper()} {'on' if value else 'off'}")
        if self.break_on:
            parts.append("break")
        return ", ".join(parts)


class LineControl:
    """A device's line settings: what is in force on its link, and who may change it.

    Only a local serial port under session sharing takes changes, and only from the client that holds it;
    its settings stay for that lease, come back after a link reopens during it, and give way to the
    configured ones when the lease ends (restore()). Every change is synchronous (termios and ioctls on a
    non-blocking descriptor), so no other task runs between a change and its answer.

    Error handling: a port that refuses a change keeps what it had, which `in_force` then says; a port
    with no modem lines (a pseudo-terminal) takes DTR and RTS as asked, there being no line to hold
    them, and that is logged once at DEBUG. A lease's first LOGGED_CHANGES changes and refusals are
    logged at INFO, later ones at DEBUG.
    """

    def __init__(self, device: Device) -> None:
        self._device = device
        self.configured = LineSettings.configured(device.config)
        # What applies now: the configured settings, or the holder's.
        self.wanted = self.configured
        # What the line has, as read back after each change (modem lines and break as last set).
        self.in_force = self.configured
        self.owner: str | None = None
        self._link: SerialLink | None = None
        self._no_modem_lines_logged = False
        self._logged_changes = 0

    @property
    def _serial(self) -> bool:
        return self._device.config.type == "serial"

    def why_fixed(self, client: str) -> str | None:
        """Why `client` may not change the line (None: it may), in an operator's words."""
        config = self._device.config
        if not self._serial:
            kind = {"tcp": "a TCP device", "simulator": "a simulated device", "dialin": "a dial-in device"}
            return f"it is {kind.get(config.type, config.type)}, not a local serial port"
        if config.sharing == "exchange":
            return "under exchange sharing clients take turns request by request; the line keeps its settings"
        if self._device.holder != client:
            return "it does not hold the device"
        return None

    def change(self, client: str, **changes: object) -> LineSettings:
        """Applies `changes` (LineSettings fields) for `client`, which holds the device (why_fixed() is
        None); returns the settings in force afterwards."""
        self.owner = client
        self.wanted = attrs.evolve(self.wanted, **changes)
        if self._link is None:
            return self.wanted  # applied when the link opens
        before = self.in_force
        self._apply(self.wanted)
        # What the port did not take is not asked again at the next change or reopen.
        self.wanted = self.in_force
        if self.in_force != before:
            self._log_change(
                "{}: line now {} (set by {})",
                self._device.name,
                self.in_force.describe(),
                client,
                device=self._device.name,
                client=client,
                event="line_settings",
            )
        return self.in_force

    def restore(self) -> None:
        """The holder's lease ended: the configured settings come back, if it changed any."""
        owner, self.owner = self.owner, None
        self._logged_changes = 0
        if owner is None or self.wanted == self.configured:
            self.wanted = self.configured
            return
        self.wanted = self.configured
        if self._link is not None:
            self._apply(self.configured)
        logger.info(
            "{}: line back to its configured {} after {}'s lease",
            self._device.name,
            # With no link, the configured settings are what the next open sets.
            (self.in_force if self._link is not None else self.configured).describe(),
            owner,
            device=self._device.name,
            client=owner,
            event="line_settings",
        )

    def link_opened(self, link: SerialLink) -> None:
        """A link opened (with the configured settings, links.serial): the holder's settings, if it set
        any, are applied again."""
        if not self._serial:
            return
        self._link = link
        self.in_force = self.configured
        try:
            self.in_force = link.framing(self.configured)
        except termios.error:
            return  # the port is gone already: the reader finds out
        if self.wanted != self.configured:
            self._apply(self.wanted)
            logger.info(
                "{}: line set again to {} for {} after the link reopened",
                self._device.name,
                self.in_force.describe(),
                self.owner,
                device=self._device.name,
                event="line_settings",
            )

    def link_closed(self) -> None:
        self._link = None

    def modem_state(self) -> int | None:
        """The port's TIOCM_ modem-line bits, or None where there are none to read (no local serial port,
        no link, a pseudo-terminal)."""
        if self._link is None:
            return None
        try:
            return self._link.modem_lines()
        except OSError:
            return None

    def purge(self, receive: bool, transmit: bool) -> None:
        """Drops what the port's buffers hold (the holder's PURGE-DATA); a port that is gone is left to the reader."""
        if self._link is not None:
            with contextlib.suppress(termios.error):
                self._link.purge(receive, transmit)

    def _apply(self, wanted: LineSettings) -> None:
        """Puts `wanted` on the link; `in_force` then says what the port took."""
        link, before, name = self._link, self.in_force, self._device.name
        try:
            if not wanted.framing_of(before):
                try:
                    link.set_framing(wanted)
                except ValueError as exc:
                    self._log_change("{}: {}; the line stays at {} baud", name, exc, before.baudrate, device=name)
                    wanted = attrs.evolve(wanted, baudrate=before.baudrate)
                    link.set_framing(wanted)
            for line in ("dtr", "rts"):
                value = getattr(wanted, line)
                if value is not None and value != getattr(before, line):
                    self._set_modem_line(link, line, value)
            if wanted.break_on != before.break_on:
                link.set_break(wanted.break_on)
            self.in_force = link.framing(wanted)
        except (termios.error, OSError) as exc:
            with contextlib.suppress(termios.error):  # the port is gone: the reader finds out
                self.in_force = link.framing(before)
            self._log_change(
                "{}: the port refused the line settings {}: {}; it has {}",
                name,
                wanted.describe(),
                exc,
                self.in_force.describe(),
                device=name,
                event="line_settings",
            )

    def _log_change(self, message: str, *args: object, **extra: object) -> None:
        """A line about a change or a refusal: at INFO for the lease's first LOGGED_CHANGES, then at DEBUG."""
        level = "INFO" if self._logged_changes < LOGGED_CHANGES else "DEBUG"
        self._logged_changes += 1
        logger.log(level, message, *args, **extra)

    def _set_modem_line(self, link: SerialLink, line: str, on: bool) -> None:
        try:
            link.set_modem_line(line, on)
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                raise
            if not self._no_modem_lines_logged:
                self._no_modem_lines_logged = True
                logger.debug(
                    "{}: {} has no modem lines (a pseudo-terminal?): DTR and RTS are answered as asked",
                    self._device.name,
                    self._device.config.path,
                    device=self._device.name,
                )
