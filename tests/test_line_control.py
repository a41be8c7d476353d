"""Serial line control end to end on pseudo-terminals: settings.toml's line keys at open, and RFC 2217
clients (our own and pyserial's) from their bytes to the device pty's termios."""

from __future__ import annotations

import termios

import pytest
import serial
import trio

from proxy.config import ConfigError, parse
from proxy.rfc2217 import Command, ComPortMessage, Control, TelnetCodec, escape

from helpers import WAIT_LIMIT, PtyDevice, connect, receive_exactly, running_proxy, settings_for, wait_for

EVERY_BYTE = bytes(range(256))


def serial_device(pty: PtyDevice, **keys: object) -> dict:
    return {"name": "port", "type": "serial", "path": str(pty.path), "listen_rfc2217": ["127.0.0.1:0"], **keys}


def termios_of(pty: PtyDevice) -> list:
    """The device pty's termios (through its slave, where the proxy set it)."""
    return termios.tcgetattr(pty._slave)


class ComPortClient:
    """A test's RFC 2217 client: requests and their answers, and data with 0xFF doubled."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.codec = TelnetCodec(server=False)
        self.data = bytearray()
        self.messages: list[ComPortMessage] = []

    @classmethod
    async def open(cls, address) -> ComPortClient:
        client = cls(await trio.open_tcp_stream(address.host, address.port))
        await client.stream.send_all(client.codec.data_to_send())
        return client

    async def _read(self) -> None:
        raw = await self.stream.receive_some()
        assert raw, "the proxy closed the connection"
        data, events = self.codec.feed(raw)
        self.data += data
        self.messages += events
        if owed := self.codec.data_to_send():
            await self.stream.send_all(owed)

    async def ask(self, command: Command, value: int | None = None) -> ComPortMessage:
        """Sends one request and returns the server's answer to it."""
        await self.stream.send_all(self.codec.message(command, value))
        with trio.fail_after(WAIT_LIMIT):
            while True:
                for message in self.messages:
                    if message.command is command:
                        self.messages.remove(message)
                        return message
                await self._read()

    async def receive(self, count: int) -> bytes:
        with trio.fail_after(WAIT_LIMIT):
            while len(self.data) < count:
                await self._read()
        data, self.data = bytes(self.data[:count]), self.data[count:]
        return data


async def test_every_set_command_is_answered_with_what_the_device_pty_then_has(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        device = running.devices["port"]
        client = await ComPortClient.open(running.addresses["port"][1])
        assert (await client.ask(Command.SET_BAUDRATE, 9600)).value == 9600
        assert pty.line_speed() == 9600
        assert (await client.ask(Command.SET_BAUDRATE, 0)).value == 9600  # a query
        # Linux's pty driver keeps 8 data bits and no parity whatever it is told: the answer says so.
        assert (await client.ask(Command.SET_DATASIZE, 7)).value == 8
        assert termios_of(pty)[2] & termios.CSIZE == termios.CS8
        assert (await client.ask(Command.SET_PARITY, 3)).value == 1
        assert not termios_of(pty)[2] & termios.PARENB
        assert (await client.ask(Command.SET_STOPSIZE, 2)).value == 2
        assert termios_of(pty)[2] & termios.CSTOPB
        assert (await client.ask(Command.SET_CONTROL, Control.FLOW_HARDWARE)).value == Control.FLOW_HARDWARE
        assert termios_of(pty)[2] & termios.CRTSCTS
        assert (await client.ask(Command.SET_CONTROL, Control.FLOW_XONXOFF)).value == Control.FLOW_XONXOFF
        assert termios_of(pty)[0] & termios.IXON and not termios_of(pty)[2] & termios.CRTSCTS
        assert (
            await client.ask(Command.SET_CONTROL, Control.REQUEST_INBOUND_FLOW)
        ).value == Control.INBOUND_FLOW_XONXOFF
        assert (await client.ask(Command.SET_CONTROL, Control.FLOW_NONE)).value == Control.FLOW_NONE
        assert not termios_of(pty)[0] & termios.IXON
        # A pty has no modem lines: DTR and RTS are answered as asked.
        assert (await client.ask(Command.SET_CONTROL, Control.DTR_OFF)).value == Control.DTR_OFF
        assert (await client.ask(Command.SET_CONTROL, Control.REQUEST_DTR)).value == Control.DTR_OFF
        assert (await client.ask(Command.SET_CONTROL, Control.RTS_ON)).value == Control.RTS_ON
        assert (await client.ask(Command.SET_CONTROL, Control.BREAK_ON)).value == Control.BREAK_ON
        assert (await client.ask(Command.SET_CONTROL, Control.BREAK_OFF)).value == Control.BREAK_OFF
        assert (await client.ask(Command.PURGE_DATA, 3)).value == 3
        assert (await client.ask(Command.SET_LINESTATE_MASK, 0)).value == 0
        assert (await client.ask(Command.SET_MODEMSTATE_MASK, 0xFF)).value == 0xFF
        signature = await client.ask(Command.SIGNATURE)
        assert b"port" in signature.text
        assert device.line.in_force.baudrate == 9600
        # No modem-state notification: a pty has no lines to read.
        assert not [m for m in client.messages if m.command is Command.NOTIFY_MODEMSTATE]
        await client.stream.aclose()
    await device_end.aclose()


async def test_every_byte_value_crosses_unchanged_both_ways(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        client = await ComPortClient.open(running.addresses["port"][1])
        await client.stream.send_all(escape(EVERY_BYTE * 2))
        assert await receive_exactly(device_end, 512) == EVERY_BYTE * 2
        await device_end.send_all(EVERY_BYTE * 2)
        assert await client.receive(512) == EVERY_BYTE * 2
        await client.stream.aclose()
    await device_end.aclose()


async def test_the_configured_settings_come_back_when_the_lease_ends(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty, baudrate=19200))) as running:
        device = running.devices["port"]
        client = await ComPortClient.open(running.addresses["port"][1])
        await client.ask(Command.SET_BAUDRATE, 2400)
        await client.ask(Command.SET_STOPSIZE, 2)
        assert pty.line_speed() == 2400
        await client.stream.aclose()
        await wait_for(device, lambda: device.holder is None)
        assert pty.line_speed() == 19200 and not termios_of(pty)[2] & termios.CSTOPB
    await device_end.aclose()


async def test_exchange_sharing_refuses_a_change_answers_the_configured_value_and_logs_it(pty, log_lines):
    device_end = pty.plug()
    keys = serial_device(pty, baudrate=19200, sharing="exchange")
    async with running_proxy(settings_for(keys)) as running:
        client = await ComPortClient.open(running.addresses["port"][1])
        assert (await client.ask(Command.SET_BAUDRATE, 9600)).value == 19200
        assert (await client.ask(Command.SET_BAUDRATE, 4800)).value == 19200
        assert pty.line_speed() == 19200
        refusals = [line for line in log_lines if "not applied" in line]
        assert len(refusals) == 1 and "exchange sharing" in refusals[0]  # once per client
        await client.stream.aclose()
    await device_end.aclose()


async def test_a_device_that_is_no_local_serial_port_answers_configured_values_and_says_why(log_lines):
    keys = {"name": "sim", "type": "simulator", "protocol": "custom", "listen_rfc2217": ["127.0.0.1:0"]}
    async with running_proxy(settings_for(keys)) as running:
        client = await ComPortClient.open(running.addresses["sim"][1])
        assert (await client.ask(Command.SET_BAUDRATE, 9600)).value == 115200
        assert (await client.ask(Command.SET_CONTROL, Control.DTR_ON)).value == Control.DTR_ON
        assert any("not a local serial port" in line for line in log_lines)
        await client.stream.aclose()


async def test_a_plain_and_an_rfc2217_client_take_turns_at_one_device(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        device = running.devices["port"]
        telnet = await ComPortClient.open(running.addresses["port"][1])
        await telnet.ask(Command.SET_BAUDRATE, 9600)
        plain = await connect(running, "port")
        await wait_for(device, lambda: device.waiting == 1)
        await plain.send_all(b"plain\xff")  # queued behind the holder
        await telnet.stream.send_all(escape(b"telnet\xff"))
        assert await receive_exactly(device_end, 7) == b"telnet\xff"
        await device_end.send_all(b"\xffok")
        assert await telnet.receive(3) == b"\xffok"
        await telnet.stream.aclose()
        assert await receive_exactly(device_end, 6) == b"plain\xff"
        assert pty.line_speed() == 115200  # the holder's rate ended with its lease
        await device_end.send_all(b"\xffok")
        assert await receive_exactly(plain, 3) == b"\xffok"
        await plain.aclose()
    await device_end.aclose()


@pytest.mark.filterwarnings("ignore:set(Daemon|Name):DeprecationWarning")  # pyserial 3.5: its reader thread
async def test_pyserial_opens_the_port_sets_its_rate_and_exchanges_bytes(pty):
    device_end = pty.plug()
    async with running_proxy(settings_for(serial_device(pty))) as running:
        address = running.addresses["port"][1]

        def open_port() -> serial.SerialBase:
            # pyserial sets the rate and framing, the flow control, DTR and RTS as it opens, and waits
            # for each answer: on a pty, DTR and RTS must be answered too.
            return serial.serial_for_url(f"rfc2217://127.0.0.1:{address.port}", baudrate=4800, timeout=WAIT_LIMIT)

        port = await trio.to_thread.run_sync(open_port)
        try:
            assert pty.line_speed() == 4800
            await trio.to_thread.run_sync(port.write, b"hello\xff")
            assert await receive_exactly(device_end, 6) == b"hello\xff"
            await device_end.send_all(b"\xffworld")
            assert await trio.to_thread.run_sync(port.read, 6) == b"\xffworld"
            await trio.to_thread.run_sync(setattr, port, "baudrate", 1200)
            assert pty.line_speed() == 1200
        finally:
            await trio.to_thread.run_sync(port.close)
    await device_end.aclose()


async def test_rtscts_and_xonxoff_are_applied_at_open(pty):
    device_end = pty.plug()
    keys = {"name": "port", "type": "serial", "path": str(pty.path), "rtscts": True, "xonxoff": True, "dtr": "on"}
    async with running_proxy(settings_for(keys)) as running:
        device = running.devices["port"]
        await wait_for(device, lambda: device.link_up)
        attributes = termios_of(pty)
        assert attributes[2] & termios.CRTSCTS
        assert attributes[0] & termios.IXON and attributes[0] & termios.IXOFF
    await device_end.aclose()


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"type": "tcp", "path": "127.0.0.1:9", "rtscts": True}, 'rtscts = True is for type = "serial" devices'),
        ({"type": "serial", "path": "/dev/ttyS0", "dtr": "high"}, "dtr 'high' is not one of on, off, keep"),
        (
            {"type": "serial", "path": "/dev/ttyS0", "xonxoff": "yes"},
            "xonxoff 'yes' is a string, expected true or false",
        ),
        (
            {"type": "serial", "path": "/dev/ttyS0", "listen_rfc2217": ["8000"]},
            "listen_rfc2217 '8000' is not HOST:PORT",
        ),
    ],
)
def test_line_keys_are_checked_with_the_key_named(keys, problem):
    with pytest.raises(ConfigError) as error:
        parse({"device": [{"name": "port", "listen": ["127.0.0.1:0"], **keys}]})
    assert any(problem in line for line in error.value.problems), error.value.problems


def test_an_rfc2217_port_alone_reaches_a_device_and_its_port_clashes_are_found():
    settings = parse({"device": [{"name": "a", "path": "/dev/ttyS0", "listen_rfc2217": ["127.0.0.1:8100"]}]})
    assert 8100 in settings.listener_ports()
    with pytest.raises(ConfigError, match="clashes"):
        parse(
            {
                "device": [
                    {"name": "a", "path": "/dev/ttyS0", "listen_rfc2217": ["127.0.0.1:8100"]},
                    {"name": "b", "path": "/dev/ttyS1", "listen": ["127.0.0.1:8100"]},
                ]
            }
        )
