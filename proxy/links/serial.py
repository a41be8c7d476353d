"""Serial links with trio-serial, fixed for its false end-of-file and opened exclusively."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import termios

import trio
import trio_serial

from proxy.config import DeviceConfig
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


class SerialLink(trio_serial.SerialStream):
    """A serial port as a trio Stream whose end-of-file and errors mean what they say.

    trio-serial 0.4.0 sets VMIN=0/VTIME=0, so read() on an idle tty can return 0 bytes after a spurious
    wake-up: that is not end-of-file unless poll() reports a hang-up. A vanished port raises EIO, which
    this class turns into trio.BrokenResourceError like any other broken stream.
    """

    def fileno(self) -> int:
        return self.fd

    async def _recv(self, max_bytes: int | None) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, max_bytes or READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise trio.BrokenResourceError(f"{self.port}: {exc.strerror}") from exc
            if not data:
                if self._hung_up():
                    return data
                continue
            return self._more(data, max_bytes or READ_SIZE)

    def _more(self, data: bytes, max_bytes: int) -> bytes:
        """`data` and what else the tty holds now, up to `max_bytes`, with no scheduling point.

        A tty gives at most one line-discipline buffer (about 4 KiB) a read; under bulk traffic the
        next one is often there already, and each chunk costs the proxy a wake-up and a write to the
        client, so a full chunk is followed by reads until the tty has nothing more.
        """
        if len(data) < MORE_AFTER:
            return data
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
    )
    try:
        await link.aopen()
        # flock only binds programs that also flock; TIOCEXCL makes the kernel refuse every other open.
        fcntl.ioctl(link.fd, termios.TIOCEXCL)
        termios.tcflush(link.fd, termios.TCIFLUSH)
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
