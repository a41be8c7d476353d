"""Soak: mixed load with random faults on several devices; prints crossed and lost answers, RSS and stalls.

Run: .venv/bin/python bench/soak.py [--seconds 600] [--quick]

The proxy runs in a child process with a task that measures how late the event loop wakes it (the
longest stall). This process plays the devices and the clients:
- ecr-x: a Custom register on a pseudo-terminal, exchange sharing, eight clients;
- fr-x: a Shtrih register over TCP, exchange sharing, six clients (the host ACKs each answer);
- reg-s: a Custom register on a pseudo-terminal, session sharing, four clients;
- raw-s: a raw echo device over TCP, session sharing, four clients.
Every request carries a tag (client, number) that the device echoes in its answer, so an answer that
reaches another client is seen (crossed). Faults, at random: clients reset mid-exchange, clients that
stop reading, garbage from clients and from devices, answers slower than response_timeout, links
dropped by the device. A request has an outcome when its client got its answer, a busy reply or a
disconnect, or the device itself failed it (dropped the link, or never answered); a request whose
answer the device gave in time but that its waiting client never received is lost.
Targets: 0 crossed, 0 lost, the event loop never stalled 100 ms, RSS and descriptors back where they were.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tty
from collections import Counter
from functools import partial
from pathlib import Path

import tomli_w
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.protocols import Control, Frame, Framer, custom, shtrih

RESPONSE_TIMEOUT = 0.5
DRIVER_TIMEOUT = 3.0  # how long a client waits for an answer, as a POS driver would
SLOW_ANSWER = 1.0  # past response_timeout, within the driver's timeout: must still reach its client
STALL_LIMIT = 0.1


class Ledger:
    """Who asked what, what the devices did with it, and what each client got."""

    def __init__(self) -> None:
        self.asker: dict[bytes, str] = {}
        self.answered_in_time: set[bytes] = set()
        self.excused: set[bytes] = set()  # the device itself failed these (a dropped link)
        self.outcomes: Counter[str] = Counter()
        self.crossed = 0
        self.lost: list[bytes] = []
        self.faults: Counter[str] = Counter()

    def new_tag(self, client: str, number: int) -> bytes:
        tag = f"{client}#{number}".encode()
        self.asker[tag] = client
        return tag

    def received(self, client: str, tag: bytes, expected: bytes) -> bool:
        """An answer with `tag` reached `client`; True when it is the one it waits for."""
        owner = self.asker.get(tag)
        if owner is not None and owner != client:
            self.crossed += 1
            print(f"CROSSED: {client} got the answer for {tag!r}", file=sys.stderr)
        return tag == expected

    def timed_out(self, tag: bytes) -> None:
        if tag in self.answered_in_time and tag not in self.excused:
            self.lost.append(tag)
            self.outcomes["lost"] += 1
        else:
            self.outcomes["device failed it"] += 1


# -- the devices --------------------------------------------------------------------------------------


def chance(probability: float) -> bool:
    return random.random() < probability


class PtyDevice:
    """A device on a pseudo-terminal that survives the proxy's reopens; `replug` drops its link."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.master: trio.lowlevel.FdStream | None = None
        self._slave = -1

    def plug(self) -> trio.lowlevel.FdStream:
        master, self._slave = os.openpty()
        tty.setraw(master)
        tty.setraw(self._slave)
        self.path.unlink(missing_ok=True)
        self.path.symlink_to(os.ttyname(self._slave))
        self.master = trio.lowlevel.FdStream(master)
        return self.master

    async def replug(self) -> trio.lowlevel.FdStream:
        os.close(self._slave)
        await self.master.aclose()
        return self.plug()


async def custom_device(ledger: Ledger, device: PtyDevice, stop: trio.Event) -> None:
    """A Custom register: ACK at once, then the response echoing the request's data."""
    link = device.master
    framer = custom.Framer(from_device=False)
    while not stop.is_set():
        with trio.move_on_after(2.0) as idle:
            data = await link.receive_some(65536)
        if idle.cancelled_caught:
            if chance(0.5):
                await link.send_all(os.urandom(20))  # line noise while nobody is owed anything
                ledger.faults["device garbage"] += 1
            continue
        for event in framer.feed(data):
            if not isinstance(event, Frame):
                continue
            try:
                message = custom.decode(event.raw)
            except custom.ProtocolError:
                await link.send_all(bytes((custom.NAK,)))
                continue
            tag = message.data
            await link.send_all(bytes((custom.ACK,)))
            if chance(0.01):
                ledger.excused.add(tag)
                ledger.faults["link dropped mid-answer"] += 1
                link = await device.replug()
                framer = custom.Framer(from_device=False)
                break
            delay = SLOW_ANSWER if chance(0.03) else random.uniform(0, 0.01)
            ledger.faults["slow answer"] += delay == SLOW_ANSWER
            await trio.sleep(delay)
            await link.send_all(custom.build_frame(message.command, b"\x00\x00" + tag))
            if delay < RESPONSE_TIMEOUT:
                ledger.answered_in_time.add(tag)


async def shtrih_device(ledger: Ledger, stream: trio.SocketStream) -> None:
    """A Shtrih register on one TCP connection: ACK, the response echoing the data, the host's ACK."""
    framer = shtrih.Framer()
    async with stream:
        while data := await stream.receive_some(65536):
            for event in framer.feed(data):
                if isinstance(event, Control) and event.byte == shtrih.ENQ:
                    await stream.send_all(bytes((shtrih.NAK,)))
                if not isinstance(event, Frame):
                    continue
                try:
                    command, tag = shtrih.decode(event.raw)
                except shtrih.ProtocolError:
                    await stream.send_all(bytes((shtrih.NAK,)))
                    continue
                await stream.send_all(bytes((shtrih.ACK,)))
                if chance(0.01):
                    ledger.excused.add(tag)
                    ledger.faults["link dropped mid-answer"] += 1
                    return
                delay = SLOW_ANSWER if chance(0.03) else random.uniform(0, 0.01)
                ledger.faults["slow answer"] += delay == SLOW_ANSWER
                await trio.sleep(delay)
                await stream.send_all(shtrih.build_frame(command, bytes((0,)) + tag))
                if delay < RESPONSE_TIMEOUT:
                    ledger.answered_in_time.add(tag)


async def raw_device(ledger: Ledger, stream: trio.SocketStream) -> None:
    """An echo device on one TCP connection: each request answered "ANS:" + request after a moment."""
    async with stream:
        while data := await stream.receive_some(65536):
            if chance(0.01):
                ledger.excused.add(data)
                ledger.faults["link dropped mid-answer"] += 1
                return
            delay = SLOW_ANSWER if chance(0.03) else random.uniform(0, 0.01)
            ledger.faults["slow answer"] += delay == SLOW_ANSWER
            await trio.sleep(delay)
            await stream.send_all(b"ANS:" + data)
            if delay < RESPONSE_TIMEOUT:
                ledger.answered_in_time.add(data)


# -- the clients --------------------------------------------------------------------------------------


def reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))


async def exchange_client(ledger: Ledger, name: str, port: int, protocol: str, stop: trio.Event) -> None:
    """Stays connected and asks, request after request, in the register's protocol."""
    number = 0
    while not stop.is_set():
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)
            continue
        framer = custom.Framer(from_device=True) if protocol == "custom" else shtrih.Framer()
        async with stream:
            while not stop.is_set():
                number += 1
                tag = ledger.new_tag(name, number)
                request = custom.build_frame(0x13, tag) if protocol == "custom" else shtrih.build_frame(0x10, tag)
                if chance(0.01):
                    await stream.send_all(os.urandom(30))  # garbage before a request: NAKed or dropped
                    ledger.faults["client garbage"] += 1
                try:
                    await stream.send_all(request)
                    if chance(0.02):
                        reset(stream)
                        ledger.outcomes["client reset mid-exchange"] += 1
                        break
                    if chance(0.003):
                        ledger.faults["client stopped reading"] += 1
                        with trio.move_on_after(DRIVER_TIMEOUT * 3):
                            while not stop.is_set():
                                await stream.send_all(request)
                        ledger.outcomes["client stopped reading"] += 1
                        break
                    outcome = await await_answer(ledger, name, stream, framer, tag, protocol)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = "disconnected"
                ledger.outcomes[outcome] += 1
                if outcome != "answered":
                    if outcome == "timed out":
                        ledger.timed_out(tag)
                    break


async def await_answer(
    ledger: Ledger, name: str, stream: trio.SocketStream, framer: Framer, tag: bytes, protocol: str
) -> str:
    acked = False
    with trio.move_on_after(DRIVER_TIMEOUT):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return "disconnected"
            for event in framer.feed(data):
                if isinstance(event, Control) and not acked:
                    # A NAK before the ACK is the register's (or line noise's) "not taken": a driver
                    # sends the command again; that is this request's outcome.
                    if event.byte == custom.NAK:
                        return "NAK"
                    acked = event.byte == custom.ACK
                if not isinstance(event, Frame):
                    continue
                try:
                    if protocol == "custom":
                        message = custom.decode(event.raw)
                        answer_tag = message.data[2:]
                    else:
                        _, answer_data = shtrih.decode(event.raw)
                        answer_tag = answer_data[1:]
                        await stream.send_all(bytes((shtrih.ACK,)))
                except custom.ProtocolError:
                    continue
                if ledger.received(name, answer_tag, tag):
                    return "answered"
    return "timed out"


async def session_client(ledger: Ledger, name: str, port: int, protocol: str, stop: trio.Event) -> None:
    """Connects, asks once, and leaves (now and then resetting right after asking)."""
    number = 0
    while not stop.is_set():
        number += 1
        tag = ledger.new_tag(name, number)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)
            continue
        async with stream:
            request = custom.build_frame(0x13, tag) if protocol == "custom" else tag
            try:
                await stream.send_all(request)
                if chance(0.05):
                    reset(stream)
                    ledger.outcomes["client reset mid-exchange"] += 1
                    continue
                outcome = await session_answer(ledger, name, stream, tag, protocol)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "disconnected"
            ledger.outcomes[outcome] += 1
            if outcome == "timed out":
                ledger.timed_out(tag)


async def session_answer(ledger: Ledger, name: str, stream: trio.SocketStream, tag: bytes, protocol: str) -> str:
    framer = custom.Framer(from_device=True)
    received = b""
    with trio.move_on_after(DRIVER_TIMEOUT):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return "refused or disconnected"
            if protocol == "raw":
                received += data
                if received.startswith(b"ANS:") and len(received) >= 4 + len(tag):
                    ledger.received(name, received[4 : 4 + len(tag)], tag)
                    return "answered"
                continue
            for event in framer.feed(data):
                if isinstance(event, Frame) and ledger.received(name, custom.decode(event.raw).data[2:], tag):
                    return "answered"
    return "timed out"


# -- the proxy in its own process ---------------------------------------------------------------------


async def proxy_process(settings_path: str) -> None:
    """The proxy, plus a task that measures the event loop's longest stall; JSON on stdout at SIGTERM."""
    from proxy import config, log
    from proxy.app import serve

    settings = config.load(settings_path)
    log.setup(settings.proxy)
    longest = 0.0

    async def watch_stalls() -> None:
        nonlocal longest
        while True:
            started = trio.current_time()
            await trio.sleep(0.01)
            longest = max(longest, trio.current_time() - started - 0.01)

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, settings)
            nursery.start_soon(watch_stalls)
            print(json.dumps({"ready": {name: a[0].port for name, a in running.addresses.items()}}), flush=True)
            async for _ in signals:
                counters = {name: device.counters for name, device in running.devices.items()}
                exchanges = {name: sum(c.exchanges.values()) for name, c in counters.items()}
                print(json.dumps({"stall": longest, "exchanges": exchanges}), flush=True)
                nursery.cancel_scope.cancel()


def process_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def settings_toml(ecr: Path, reg: Path, ports: dict[str, int]) -> str:
    """The proxy's settings: two exchange-sharing and two session-sharing devices."""
    common = {"response_timeout": RESPONSE_TIMEOUT, "exchange_timeout": 3.0, "reconnect_interval": 0.1}
    common["listen"] = ["127.0.0.1:0"]
    exchange = {**common, "sharing": "exchange", "acquire_timeout": 5.0, "client_write_timeout": 2.0}
    session = {**common, "acquire_timeout": 2.0, "busy_reply": "15"}
    devices = [
        {"name": "ecr-x", "type": "serial", "path": str(ecr), "protocol": "custom", **exchange},
        {"name": "fr-x", "type": "tcp", "path": f"127.0.0.1:{ports['fr']}", "protocol": "shtrih", **exchange},
        {"name": "reg-s", "type": "serial", "path": str(reg), "protocol": "custom", **session},
        {"name": "raw-s", "type": "tcp", "path": f"127.0.0.1:{ports['raw']}", "frame_gap": 0.02, **session},
    ]
    return tomli_w.dumps({"proxy": {"status": "", "log_level": "WARNING"}, "device": devices})


async def start_devices(ledger: Ledger, work: Path, nursery: trio.Nursery, stop: trio.Event) -> str:
    """Starts the simulated devices; returns the proxy's settings for them."""
    ecr, reg = PtyDevice(work / "ttyECR"), PtyDevice(work / "ttyREG")
    for device in (ecr, reg):
        device.plug()
        nursery.start_soon(custom_device, ledger, device, stop)
    ports = {}
    for name, handler in (("fr", shtrih_device), ("raw", raw_device)):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        ports[name] = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, partial(handler, ledger), listeners)
    return settings_toml(ecr.path, reg.path, ports)


async def run_clients(ledger: Ledger, ports: dict[str, int], seconds: float, stop: trio.Event) -> None:
    async with trio.open_nursery() as clients:
        for device, protocol, count in (("ecr-x", "custom", 8), ("fr-x", "shtrih", 6)):
            for index in range(count):
                name = f"{device}/{index}"
                clients.start_soon(exchange_client, ledger, name, ports[device], protocol, stop)
        for device, protocol in (("reg-s", "custom"), ("raw-s", "raw")):
            for index in range(4):
                clients.start_soon(session_client, ledger, f"{device}/{index}", ports[device], protocol, stop)
        await trio.sleep(seconds)
        stop.set()


async def soak(seconds: float) -> int:
    ledger = Ledger()
    stop = trio.Event()
    with tempfile.TemporaryDirectory() as work:
        settings = Path(work) / "settings.toml"
        async with trio.open_nursery() as devices:
            settings.write_text(await start_devices(ledger, Path(work), devices, stop))
            command = [sys.executable, __file__, "--proxy", str(settings)]
            proxy = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
            lines = LineReader(proxy.stdout)
            ports = json.loads(await lines.next())["ready"]
            await trio.sleep(1.0)
            start = process_figures(proxy.pid)
            print(f"soak for {seconds:g} s: proxy pid {proxy.pid}, RSS {start[0]} KiB, {start[1]} descriptors")
            await run_clients(ledger, ports, seconds, stop)
            await trio.sleep(DRIVER_TIMEOUT + 1)  # the proxy settles what the last clients left behind
            end = process_figures(proxy.pid)
            proxy.send_signal(signal.SIGTERM)
            report = json.loads(await lines.next())
            await proxy.wait()
            devices.cancel_scope.cancel()
    answered = ledger.outcomes["answered"]
    counted = sum(report["exchanges"].values())
    print(f"exchanges answered to their clients: {answered} ({answered / seconds:.0f}/s); exchange sharing: {counted}")
    print(f"outcomes: {dict(ledger.outcomes)}")
    print(f"faults injected: {dict(ledger.faults)}")
    print(f"answers delivered to the wrong client: {ledger.crossed} (must be 0)")
    print(f"requests with no outcome (lost): {len(ledger.lost)} (must be 0) {ledger.lost[:10]}")
    print(f"RSS: {start[0]} KiB at start, {end[0]} KiB at end")
    print(f"open descriptors: {start[1]} at start, {end[1]} at end")
    print(f"longest event-loop stall: {report['stall'] * 1000:.1f} ms (must stay under {STALL_LIMIT * 1000:.0f} ms)")
    ok = ledger.crossed == 0 and not ledger.lost and report["stall"] < STALL_LIMIT
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            if not data:
                raise RuntimeError("the proxy process ended")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load runs (default 600)")
    parser.add_argument("--quick", action="store_true", help="a 30 s smoke run")
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        trio.run(proxy_process, args.proxy)
        return
    started = time.monotonic()
    code = trio.run(soak, 30.0 if args.quick else args.seconds)
    print(f"(ran {time.monotonic() - started:.0f} s)")
    sys.exit(code)


if __name__ == "__main__":
    main()
