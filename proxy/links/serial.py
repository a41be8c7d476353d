"""Serial links with trio-serial, fixed for its false end-of-file and opened exclusively, with their line
settings (framing, flow control, DTR, RTS, break) read and changed while they run."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios

import trio
import trio_serial
from loguru import logger

from proxy.config import DeviceConfig
from proxy.line_control import LineSettings
from proxy.links import LinkError

PARITY = {
    "N": trio_serial.Parity.NONE,
    "E": trio_serial.Parity.EVEN,
    "O": trio_serial.Parity.ODD,
    "M": trio_serial.Parity.MARK,
    "S": trio_serial.Parity.SPACE,
}
STOPBITS = {
    1.0: trio_serial.StopBits.ONE,
    1.5: trio_serial.StopBits.ONE_POINT_FIVE,
    2.0: trio_serial.StopBits.TWO,
}
READ_SIZE = 65536
# A read this long suggests bulk traffic: the tty is read again at once (SerialLink._more).
MORE_AFTER = 2048
HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
# Linux's termios constants that Python's termios module lacks: mark/space parity, and break on/off.
CMSPAR = 0o10000000000
TIOCSBRK, TIOCCBRK = 0x5427, 0x5428
# The termios speed constants (B9600, ...) and the rates they stand for.
SPEEDS = {getattr(termios, name): int(name[1:]) for name in dir(termios) if name[:1] == "B" and name[1:].isdigit()}
SPEEDS.pop(termios.B0)  # hang up, not a rate
RATES = {rate: speed for speed, rate in SPEEDS.items()}
CSIZES = {termios.CS5: 5, termios.CS6: 6, termios.CS7: 7, termios.CS8: 8}
MODEM_BITS = {"dtr": termios.TIOCM_DTR, "rts": termios.TIOCM_RTS}


class SerialLink(trio_serial.SerialStream):
    """A serial port as a trio Stream whose end-of-file and errors mean what they say.

    trio-serial 0.4.0 sets VMIN=0/VTIME=0, so read() on an idle tty can return 0 bytes after a spurious
    wake-up: that is not end-of-file unless poll() reports a hang-up. A vanished port raises EIO, which
    this class turns into trio.BrokenResourceError like any other broken stream.
    """

    def fileno(self) -> int:
        return self.fd

    async def receive_unguarded(self, max_bytes: int = READ_SIZE) -> bytes:
        """receive_some() without trio-serial's wrapper around it (a guard against a second reading task,
        and a copy of bytes that are already bytes): for the device's reader, the link's only reader
        (wire.reader), to which each wrapper costs time on every round trip.

        A false end-of-file is read again; b"" means the port hung up. Error handling: a failed read
        raises trio.BrokenResourceError, trio.ClosedResourceError once the link is closed.
        """
        fd = self.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise trio.BrokenResourceError(f"{self.port}: {exc.strerror}") from exc
            if len(data) < MORE_AFTER:
                if data or self._hung_up():
                    return data
                continue
            return self._more(data, max_bytes)

    async def _recv(self, max_bytes: int | None) -> bytes:
        return await self.receive_unguarded(max_bytes or READ_SIZE)

    def _more(self, data: bytes, max_bytes: int) -> bytes:
        """`data` (a long read) and what else the tty holds now, up to `max_bytes`, with no scheduling point.

        A tty gives at most one line-discipline buffer (about 4 KiB) a read; under bulk traffic the
        next one is often there already, and each chunk costs the proxy a wake-up and a write to the
        client, so a full chunk is followed by reads until the tty has nothing more.
        """
        chunks = [data]
        total = len(data)
        while total < max_bytes:
            try:
                more = os.read(self.fd, max_bytes - total)
            except OSError:
                break  # EAGAIN, or an error the next read reports
            if not more:
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks)

    async def _send(self, data: memoryview) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"{self.port}: {exc.strerror}") from exc

    async def set_line_rate(self, rate: int) -> None:
        """Switches the line to `rate` baud once what was written has left it (IEC 61107 mode C).

        Error handling: trio.BrokenResourceError when the port is gone; ValueError for a rate the
        system has no constant for (the IEC rates all have one).
        """
        speed = getattr(termios, f"B{rate}", None)
        if speed is None:
            raise ValueError(f"{rate} baud is no standard rate")
        fd = self.fd
        try:
            # The bytes still in the UART belong to the old rate; tcdrain blocks, so a thread waits.
            await trio.to_thread.run_sync(termios.tcdrain, fd)
            attributes = termios.tcgetattr(fd)
            attributes[4] = attributes[5] = speed
            termios.tcsetattr(fd, termios.TCSANOW, attributes)
        except termios.error as exc:
            raise trio.BrokenResourceError(f"{self.port}: cannot set {rate} baud: {exc.args[-1]}") from exc

    def set_framing(self, settings: LineSettings) -> None:
        """Sets the rate, data bits, parity, stop bits and flow control of `settings` at once (TCSANOW).

        A pseudo-terminal keeps 8 data bits and no parity whatever it is told (Linux's pty driver), so
        framing() afterwards says what the line really has. Error handling: ValueError for a rate the
        system has no constant for (nothing is changed); termios.error when the port refuses.
        """
        speed = RATES.get(settings.baudrate)
        if speed is None:
            raise ValueError(f"{settings.baudrate} baud is no standard rate")
        iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(self.fd)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.PARODD | CMSPAR | termios.CSTOPB | termios.CRTSCTS)
        cflag |= {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}[settings.bytesize]
        cflag |= {
            "N": 0,
            "E": termios.PARENB,
            "O": termios.PARENB | termios.PARODD,
            "M": termios.PARENB | CMSPAR | termios.PARODD,
            "S": termios.PARENB | CMSPAR,
        }[settings.parity]
        # termios has no 1.5 stop bits: a UART sends 1.5 with CSTOPB at 5 data bits, 2 otherwise.
        if settings.stopbits != 1:
            cflag |= termios.CSTOPB
        if settings.rtscts:
            cflag |= termios.CRTSCTS
        iflag &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
        if settings.xonxoff:
            iflag |= termios.IXON | termios.IXOFF
        termios.tcsetattr(self.fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])

    def framing(self, asked: LineSettings) -> LineSettings:
        """The line's rate, framing and flow control as termios has them now, with `asked`'s modem lines
        and break (termios does not hold those). 1.5 stop bits, when asked, read back as CSTOPB.

        Error handling: termios.error when the port is gone.
        """
        iflag, _, cflag, _, _, ospeed, _ = termios.tcgetattr(self.fd)
        if cflag & termios.PARENB:
            parity = ("S", "M")[bool(cflag & termios.PARODD)] if cflag & CMSPAR else "EO"[bool(cflag & termios.PARODD)]
        else:
            parity = "N"
        stopbits = (asked.stopbits if asked.stopbits != 1 else 2.0) if cflag & termios.CSTOPB else 1.0
        return LineSettings(
            baudrate=SPEEDS.get(ospeed, asked.baudrate),
            bytesize=CSIZES[cflag & termios.CSIZE],
            parity=parity,
            stopbits=stopbits,
            rtscts=bool(cflag & termios.CRTSCTS),
            xonxoff=bool(iflag & termios.IXON),
            dtr=asked.dtr,
            rts=asked.rts,
            break_on=asked.break_on,
        )

    def set_modem_line(self, line: str, on: bool) -> None:
        """Raises or drops DTR or RTS (`line` is "dtr" or "rts"). Error handling: OSError(ENOTTY) on a
        pseudo-terminal, which has no modem lines; OSError when the port is gone."""
        fcntl.ioctl(self.fd, termios.TIOCMBIS if on else termios.TIOCMBIC, struct.pack("i", MODEM_BITS[line]))

    def modem_lines(self) -> int:
        """The TIOCM_ bits of the modem lines (CTS, DSR, RI, CD among them). Error handling: OSError(ENOTTY)
        on a pseudo-terminal; OSError when the port is gone."""
        return struct.unpack("i", fcntl.ioctl(self.fd, termios.TIOCMGET, b"\0" * 4))[0]

    def set_break(self, on: bool) -> None:
        """Starts or ends a break (the line held at space). Error handling: OSError from the driver."""
        fcntl.ioctl(self.fd, TIOCSBRK if on else TIOCCBRK)

    def purge(self, receive: bool, transmit: bool) -> None:
        """Drops what the kernel holds of what was received and not read, or written and not sent.

        Error handling: termios.error when the port is gone.
        """
        if receive or transmit:
            which = termios.TCIOFLUSH if receive and transmit else termios.TCIFLUSH if receive else termios.TCOFLUSH
            termios.tcflush(self.fd, which)

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return any(events & HANGUP for _, events in poller.poll(0))


async def open_serial(config: DeviceConfig) -> SerialLink:
    """Opens config.path exclusively (flock and TIOCEXCL) with the configured line settings.

    Error handling: every failure becomes a LinkError naming the path and the reason.
    """
    link = SerialLink(
        config.path,
        exclusive=True,
        baudrate=config.line_baudrate,
        bytesize=config.bytesize,
        parity=PARITY[config.parity],
        stopbits=STOPBITS[config.stopbits],
        xonxoff=config.xonxoff,
        rtscts=config.rtscts,
    )
    try:
        await link.aopen()
        # flock only binds programs that also flock; TIOCEXCL makes the kernel refuse every other open.
        fcntl.ioctl(link.fd, termios.TIOCEXCL)
        termios.tcflush(link.fd, termios.TCIFLUSH)
        _set_configured_modem_lines(link, config)
    except FileNotFoundError:
        await link.aclose()
        raise LinkError(f"{config.path}: no such device") from None
    except PermissionError:
        await link.aclose()
        raise LinkError(f"{config.path}: permission denied (is the user in the dialout group?)") from None
    except termios.error as exc:
        await link.aclose()
        raise LinkError(f"{config.path}: not a serial port ({exc.args[-1]})") from None
    except ValueError as exc:
        # The driver refused a line setting (trio-serial says so with ValueError): say which.
        await link.aclose()
        settings = f"{config.line_baudrate} {config.bytesize}{config.parity}{config.stopbits:g}"
        raise LinkError(f"{config.path}: the port refuses {settings}: {exc}") from None
    except OSError as exc:
        await link.aclose()
        if exc.errno == errno.EBUSY or "exclusively lock" in str(exc):
            raise LinkError(f"{config.path}: already in use by another program") from None
        raise LinkError(f"{config.path}: {exc.strerror or exc}") from None
    return link


def _set_configured_modem_lines(link: SerialLink, config: DeviceConfig) -> None:
    """dtr and rts as configured ("keep": as the open left them). A pseudo-terminal has no modem lines:
    said at DEBUG, and the port opens all the same. Error handling: other OSErrors propagate."""
    for line, wanted in (("dtr", config.dtr), ("rts", config.rts)):
        if wanted == "keep":
            continue
        try:
            link.set_modem_line(line, wanted == "on")
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                raise
            logger.debug("{}: {} has no modem lines; {} = {!r} not applied", config.name, config.path, line, wanted)
