"""The sans-IO Telnet COM-PORT-OPTION codec: negotiation, IAC escaping, subnegotiations, hostile input."""

from __future__ import annotations

from proxy.rfc2217 import (
    BINARY,
    COM_PORT_OPTION,
    DO,
    DONT,
    ECHO,
    IAC,
    MAX_SUBNEGOTIATION,
    SB,
    SE,
    SGA,
    WILL,
    WONT,
    Command,
    ComPortMessage,
    Malformed,
    TelnetCodec,
    escape,
)

EVERY_BYTE = bytes(range(256))


def negotiate(a: TelnetCodec, b: TelnetCodec) -> None:
    """Passes negotiation between two codecs until neither owes anything."""
    for _ in range(10):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return
        b.feed(to_b)
        a.feed(to_a)
    raise AssertionError("negotiation did not settle")


def test_server_and_client_agree_on_the_com_port_option_and_settle():
    server, client = TelnetCodec(server=True), TelnetCodec(server=False)
    negotiate(server, client)
    assert server.com_port_ready and client.com_port_ready


def test_every_byte_value_passes_unchanged_through_escaping_and_decoding():
    server = TelnetCodec(server=True)
    data, events = server.feed(escape(EVERY_BYTE * 3))
    assert data == EVERY_BYTE * 3 and events == []


def test_data_split_anywhere_decodes_the_same():
    wire = escape(EVERY_BYTE) + TelnetCodec(server=False).message(Command.SET_BAUDRATE, 0x0000FFFF) + escape(b"\xff")
    for cut in range(len(wire)):
        server = TelnetCodec(server=True)
        first, events1 = server.feed(wire[:cut])
        second, events2 = server.feed(wire[cut:])
        assert first + second == EVERY_BYTE + b"\xff"
        assert events1 + events2 == [ComPortMessage(Command.SET_BAUDRATE, 0xFFFF)]


def test_a_request_for_an_option_in_force_is_not_answered_and_unknown_options_are_refused():
    server = TelnetCodec(server=True)
    server.data_to_send()
    server.feed(bytes([IAC, WILL, COM_PORT_OPTION]))
    assert server.data_to_send() == b""  # it asked for it: the WILL is the answer
    server.feed(bytes([IAC, WILL, COM_PORT_OPTION]))
    assert server.data_to_send() == b""
    server.feed(bytes([IAC, DO, ECHO, IAC, WILL, 99]))
    assert server.data_to_send() == bytes([IAC, WONT, ECHO, IAC, DONT, 99])
    server.feed(bytes([IAC, DO, SGA]))
    assert server.data_to_send() == b""  # the answer to its own WILL SGA
    server.feed(bytes([IAC, DONT, SGA]))
    assert server.data_to_send() == bytes([IAC, WONT, SGA])  # switched off: acknowledged


def test_a_client_request_is_decoded_and_the_server_answer_carries_100_more():
    client, server = TelnetCodec(server=False), TelnetCodec(server=True)
    _, events = server.feed(client.message(Command.SET_PARITY, 3) + client.message(Command.NOTIFY_MODEMSTATE))
    assert events == [ComPortMessage(Command.SET_PARITY, 3), ComPortMessage(Command.NOTIFY_MODEMSTATE)]
    answer = server.message(Command.SET_PARITY, 3)
    assert answer == bytes([IAC, SB, COM_PORT_OPTION, 103, 3, IAC, SE])
    assert client.feed(answer)[1] == [ComPortMessage(Command.SET_PARITY, 3)]


def test_a_value_holding_0xff_is_doubled_inside_the_subnegotiation():
    server = TelnetCodec(server=True)
    answer = server.message(Command.SET_BAUDRATE, 0xFF00FFFF)
    assert answer.count(b"\xff\xff") == 3
    assert TelnetCodec(server=False).feed(answer)[1] == [ComPortMessage(Command.SET_BAUDRATE, 0xFF00FFFF)]


def test_malformed_subnegotiations_are_reported_and_data_goes_on():
    server = TelnetCodec(server=True)
    hostile = (
        bytes([IAC, SB, COM_PORT_OPTION, 1, 0, IAC, SE])  # baud rate of 1 byte
        + bytes([IAC, SB, COM_PORT_OPTION, 77, IAC, SE])  # unknown command
        + bytes([IAC, SB, COM_PORT_OPTION, 0])
        + b"x" * (MAX_SUBNEGOTIATION * 4)
        + bytes([IAC, SE])
        + bytes([IAC, SB, 5, 1, IAC, SE])  # another option's subnegotiation
        + b"data"
    )
    data, events = server.feed(hostile)
    assert data == b"data"
    assert len(events) == 4 and all(isinstance(event, Malformed) for event in events)


def test_a_subnegotiation_a_peer_forgot_to_end_ends_at_the_next_command():
    server = TelnetCodec(server=True)
    data, events = server.feed(bytes([IAC, SB, COM_PORT_OPTION, 2, 7, IAC, IAC]) + bytes([IAC, WILL, BINARY]) + b"x")
    assert events[0] == Malformed("SET_DATASIZE with 2 value bytes, not 1")
    data, events = TelnetCodec(server=True).feed(bytes([IAC, SB, COM_PORT_OPTION, 2, 7, IAC, DO, BINARY]) + b"x")
    assert (data, events) == (b"x", [ComPortMessage(Command.SET_DATASIZE, 7)])
