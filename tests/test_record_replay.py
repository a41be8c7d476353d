"""Recording a device's exchanges (`record`) and replaying them as a device (`simulate replay`)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing
from test_cli import LIMIT, spawn, wait_for_line

from proxy.cli import main
from proxy.config import Address, ConfigError, parse, recording_path
from proxy.protocols.custom import build_frame
from proxy.recording import (
    Recorded,
    Recorder,
    RecordingError,
    RecordSettings,
    compile_redaction,
    load_recording,
    redact,
)
from proxy.simulators import serve_pty, serve_stream, serve_tcp
from proxy.simulators.custom import CustomRegister
from proxy.simulators.replay import ReplayDevice

from helpers import (
    connect,
    device_named,
    dialin_settings,
    modem,
    online,
    receive_exactly,
    running_proxy,
    settings_for,
    wait_for,
)

H = bytes.fromhex
BEEP = H("01 05 00 13 3F 42 0F 00 A8")
STATUS = build_frame(0x01, H("3F 42 0F 00"))


def register_settings(path: Path, record: Path, **keys: object) -> dict:
    return {"name": "ecr", "type": "serial", "path": str(path), "protocol": "custom", "record": str(record), **keys}


async def ask(stream: trio.abc.Stream, request: bytes) -> bytes:
    """One Custom exchange: the request, then the ACK and the answer frame (01, its length, the command
    and data, a checksum)."""
    await stream.send_all(request)
    head = await receive_exactly(stream, 4)
    return head + await receive_exactly(stream, int.from_bytes(head[2:4], "little") + 1)


async def record_through_proxy(pty, record: Path, sharing: str) -> list[tuple[bytes, bytes]]:
    """Plays BEEP, STATUS, BEEP through the proxy to a simulated register, recording; returns what came."""
    device_end = pty.plug()
    seen = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, device_end, CustomRegister())
        async with running_proxy(settings_for(register_settings(pty.path, record, sharing=sharing))) as running:
            async with await connect(running, "ecr") as client:
                for request in (BEEP, STATUS, BEEP):
                    seen.append((request, await ask(client, request)))
            # Every exchange finished (the session's at the client's close): then the proxy stops, and
            # the recorder writes what it holds.
            await recorded(running, 3)
        nursery.cancel_scope.cancel()
    return seen


async def recorded(running, count: int) -> None:
    """Waits until `count` exchanges of the device "ecr" are recorded (queued or written)."""
    device = running.devices["ecr"]
    recorder = device.sharing.recorder
    await wait_for(device, lambda: recorder.queued + recorder.written >= count)


async def replay_through_proxy(tmp_path: Path, record: Path, requests: list[bytes], **replay: object) -> list[bytes]:
    """Serves `record` on a pty as a device, behind the proxy, and asks it `requests` through the proxy."""
    records = load_recording(record)
    link = tmp_path / "ttyREPLAY"
    answers = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_pty(
                "replay", link, model=lambda: ReplayDevice(records, **replay), task_status=task_status
            )
        )
        settings = settings_for({"name": "replayed", "type": "serial", "path": str(link), "protocol": "custom"})
        async with running_proxy(settings) as running, await connect(running, "replayed") as client:
            for request in requests:
                answers.append(await ask(client, request))
        nursery.cancel_scope.cancel()
    return answers


@pytest.mark.parametrize("sharing", ["exchange", "session"])
async def test_a_recording_through_the_proxy_replays_the_same_answers_to_the_same_requests(pty, tmp_path, sharing):
    record = tmp_path / "ecr.jsonl"
    seen = await record_through_proxy(pty, record, sharing)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(H(line["request"]), H(line["answer"])) for line in lines] == seen
    for line in lines:
        assert line["device"] == "ecr" and line["result"] == "ok" and line["client"].startswith("127.0.0.1:")
        assert 0 <= line["first_byte"] <= line["complete"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["at"])
    # Asked in another order, the replayed device gives each request its own recorded answer.
    requests = [STATUS, BEEP, BEEP, STATUS]
    recorded = dict(seen)
    assert await replay_through_proxy(tmp_path, record, requests) == [recorded[r] for r in requests]


async def test_raw_session_sharing_records_request_answer_pairs_split_by_silence(pty, tmp_path):
    record = tmp_path / "raw.jsonl"
    device_end = pty.plug()

    async def echo_device() -> None:
        while data := await device_end.receive_some():
            await device_end.send_all(b"<" + data + b">")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo_device)
        table = {"name": "ecr", "type": "serial", "path": str(pty.path), "record": str(record)}
        async with running_proxy(settings_for(table)) as running:
            async with await connect(running, "ecr") as client:
                for request in (b"ping", b"pong"):
                    await client.send_all(request)
                    assert await receive_exactly(client, 6) == b"<" + request + b">"
            await recorded(running, 2)
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(H(line["request"]), H(line["answer"])) for line in lines] == [(b"ping", b"<ping>"), (b"pong", b"<pong>")]


async def test_replay_in_order_gives_the_recorded_answers_in_turn_whatever_is_asked(pty, tmp_path):
    record = tmp_path / "ecr.jsonl"
    seen = await record_through_proxy(pty, record, "exchange")
    records = load_recording(record)
    async with trio.open_nursery() as nursery:
        # Straight to the device: the proxy would rightly drop a STATUS answer to a BEEP.
        ready = await nursery.start(
            lambda task_status: serve_tcp(
                "replay",
                Address("127.0.0.1", 0),
                model=lambda: ReplayDevice(records, in_order=True),
                task_status=task_status,
            )
        )
        stream = await trio.open_tcp_stream("127.0.0.1", int(ready.rsplit(":", 1)[1]))
        assert [await ask(stream, BEEP) for _ in seen] == [answer for _, answer in seen]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_replay_on_tcp_ignores_bytes_that_begin_no_recorded_request(tmp_path):
    record = tmp_path / "r.jsonl"
    record.write_text(json.dumps({"request": "0a0b", "answer": "1122", "first_byte": 0.5, "complete": 1.0}) + "\n")
    records = load_recording(record)
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(
            lambda task_status: serve_tcp(
                "replay", Address("127.0.0.1", 0), model=lambda: ReplayDevice(records), task_status=task_status
            )
        )
        stream = await trio.open_tcp_stream("127.0.0.1", int(ready.rsplit(":", 1)[1]))
        await stream.send_all(H("06 ff 0a 0b"))
        assert await receive_exactly(stream, 2) == H("11 22")
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_recorded_timing_sends_the_first_byte_then_the_rest_at_their_recorded_times():
    records = [load_line({"request": "01", "answer": "0611", "first_byte": 0.25, "complete": 1.0})]
    writes = ReplayDevice(records, timing="recorded").feed(b"\x01")
    assert [(w.data, w.delay) for w in writes] == [(b"\x06", 0.25), (b"\x11", 0.75)]
    assert [(w.data, w.delay) for w in ReplayDevice(records).feed(b"\x01")] == [(b"\x06\x11", 0.0)]


def load_line(record: dict) -> object:
    from proxy.recording import _parse_line

    return _parse_line(json.dumps(record))


# -- rotation, redaction, a full queue ----------------------------------------------------------------


async def test_the_recording_rotates_at_record_max_bytes_keeping_record_keep_old_files(tmp_path):
    path = tmp_path / "rec.jsonl"
    recorder = Recorder("ecr", RecordSettings(path, max_bytes=400, keep=2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.run)
        for number in range(20):
            take = recorder.take("c", bytes([number]), 0.0)
            take.answered(b"\x06", 0.1)
            recorder.finish(take, 0.2, "ok")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rec.jsonl", "rec.jsonl.1", "rec.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 400
    newest = [json.loads(line)["request"] for line in path.read_text().splitlines()]
    assert newest[-1] == "13"
    older = [json.loads(line)["request"] for line in (tmp_path / "rec.jsonl.1").read_text().splitlines()]
    assert int(older[-1], 16) + 1 == int(newest[0], 16)


def test_redaction_masks_matching_bytes_with_stars_keeping_lengths():
    card = compile_redaction(r"\d{13,19}")
    marker = compile_redaction(r"\x1bP(.{4})")
    literal = compile_redaction("hex:de ad")
    data = b"\x02PAN 4111111111111111 \x1bPSECRxx\xde\xad\x03"
    masked, count = redact(data, (card, marker, literal))
    assert masked == b"\x02PAN " + b"*" * 16 + b" \x1bP****xx**\x03"
    assert count == 16 + 4 + 2
    assert len(masked) == len(data)


async def test_a_redacted_recording_holds_no_matching_bytes(pty, tmp_path):
    record = tmp_path / "ecr.jsonl"
    device_end = pty.plug()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, device_end, CustomRegister())
        table = register_settings(pty.path, record, sharing="exchange", record_redact=["hex:3f 42 0f"])
        async with running_proxy(settings_for(table)) as running:
            async with await connect(running, "ecr") as client:
                await ask(client, BEEP)
            await recorded(running, 1)
        nursery.cancel_scope.cancel()
    (line,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert line["request"] == "010500132a2a2a00a8" and line["redacted"] == 3


@pytest.mark.parametrize("pattern", ["(unclosed", "hex:zz", "hex:", ".*"])
def test_a_bad_redaction_pattern_is_a_config_error_naming_the_key(tmp_path, pattern):
    with pytest.raises(ConfigError, match="record_redact"):
        settings_for(register_settings(tmp_path / "tty", tmp_path / "r.jsonl", record_redact=[pattern]))


def test_record_keys_without_record_are_a_config_error(tmp_path):
    table = {"name": "ecr", "type": "serial", "path": "/dev/ttyS0", "record_keep": 5}
    with pytest.raises(ConfigError, match="record_keep = 5 has no effect: record"):
        settings_for(table)


async def test_a_full_queue_drops_records_with_one_warning_and_never_waits(tmp_path, log_lines):
    path = tmp_path / "rec.jsonl"
    recorder = Recorder("ecr", RecordSettings(path, max_bytes=1 << 20, keep=1), queue_limit=3)
    # No writer runs (a disk that does not keep up): finish() must return at once every time.
    for number in range(10):
        take = recorder.take("c", bytes([number]), 0.0)
        recorder.finish(take, 0.0, "ok")
    assert recorder.queued == 3 and recorder.dropped == 7
    warnings = [line for line in log_lines if line.startswith("WARNING") and "falls behind" in line]
    assert len(warnings) == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["request"] for line in path.read_text().splitlines()] == ["00", "01", "02"]
    assert any("7 exchanges were left out" in line for line in log_lines)


# -- bad recordings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "holds no exchange"),
        ("not json\n", "line 1: not JSON"),
        ('{"request": "01"}\n', "line 1: 'answer' is missing"),
        ('{"request": "01", "answer": "0"}\n', "line 1: 'answer' is not hex"),
        ('{"request": "01", "answer": "06"}\n[1]\n', "line 2: not a JSON object"),
        ('{"request": "01", "answer": "06", "first_byte": -1}\n', "'first_byte' is -1"),
    ],
)
def test_a_bad_recording_is_one_line_and_exit_2(tmp_path, capsys, content, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["simulate", "replay", str(path), "--pty", str(tmp_path / "tty")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and why in error and str(path) in error
    assert not (tmp_path / "tty").exists()


def test_replay_of_a_missing_file_or_without_one_is_exit_2(tmp_path, capsys):
    assert main(["simulate", "replay", str(tmp_path / "none.jsonl"), "--pty", str(tmp_path / "tty")]) == 2
    assert "cannot read the recording" in capsys.readouterr().err
    assert main(["simulate", "replay", "--pty", str(tmp_path / "tty")]) == 2
    assert "needs the recording" in capsys.readouterr().err


def test_simulate_replay_from_the_command_line_answers_on_its_port(tmp_path):
    record = tmp_path / "r.jsonl"
    record.write_text(json.dumps({"request": "0a0b", "answer": "1122", "first_byte": 0.0, "complete": 0.0}) + "\n")
    with spawn("simulate", "replay", str(record), "--listen", "127.0.0.1:0", stdout=subprocess.PIPE) as process:
        port = int(wait_for_line(process.stdout, r"127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as host:
            host.sendall(H("0a 0b"))
            answer = b""
            while len(answer) < 2:
                answer += host.recv(16)
        assert answer == H("11 22")


# -- hostile15: the loop's share of recording, sizes, torn lines, replay cost, replay files -------------


def test_finish_queues_raw_bytes_and_the_queue_is_bounded_in_bytes_too(tmp_path, log_lines):
    settings = RecordSettings(tmp_path / "r.jsonl", 1 << 20, 1, (compile_redaction("(a+)+$"),))
    recorder = Recorder("ecr", settings, queue_bytes=10_000)
    for _ in range(3):
        take = recorder.take("c", b"a" * 4000 + b"!", 0.0)
        recorder.finish(take, 0.0, "ok")  # no regex, hex or JSON here: the writer thread does them
    assert recorder.queued == 2 and recorder.dropped == 1
    assert isinstance(recorder._queue[0][0]["request"], bytes)


def test_a_record_keeps_at_most_max_record_bytes_and_says_truncated(tmp_path):
    recorder = Recorder("ecr", RecordSettings(tmp_path / "r.jsonl", 1 << 20, 1, max_record=8))
    take = recorder.take("c", b"0123456789", 0.0)
    take.requested(b"more")
    for _ in range(100):
        take.answered(b"x" * 1000, 0.1)
    assert len(take.request) == 8 and len(take.answer) == 8 and take.truncated
    recorder.finish(take, 0.2, "ok")
    line = json.loads(recorder._format(recorder._queue[0][0]))
    assert line["truncated"] is True and line["answer"] == (b"x" * 8).hex()


def test_a_failed_write_leaves_no_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    recorder = Recorder("ecr", RecordSettings(path, 1 << 20, 1))
    recorder._write_lines(['{"a": 1}\n'])

    class Full:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:3])
            self.file.flush()
            raise OSError(28, "No space left on device")

        def close(self):
            self.file.close()

    recorder._file = Full(recorder._file)
    with pytest.raises(OSError):
        recorder._write_lines(['{"b": 2}\n'])
    assert path.read_text() == '{"a": 1}\n'
    recorder._write_lines(['{"c": 3}\n'])
    recorder._close_quietly()
    assert path.read_text() == '{"a": 1}\n{"c": 3}\n'


def test_replay_of_a_long_request_is_linear():
    request = bytes(range(256)) * 128  # 32 KB: every prefix kept would be 500 MB
    records = [Recorded(request, b"ok", None, None)]
    device = ReplayDevice(records)
    writes = []
    for start in range(0, len(request), 1000):
        writes += device.feed(request[start : start + 1000])
    assert [write.data for write in writes] == [b"ok"]
    assert ReplayDevice(records)._trie is device._trie  # built once per recording


def test_replay_files_that_are_not_regular_deep_or_hold_line_separators(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RecordingError, match="not a regular file"):
        load_recording(fifo)
    with pytest.raises(RecordingError):
        load_recording(tmp_path)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecordingError, match="line 1"):
        load_recording(deep)
    spaced = tmp_path / "u2028.jsonl"
    spaced.write_text('{"request": "01", "answer": "02", "client": "a\u2028b\x85c"}\n', encoding="utf-8")
    assert [record.answer for record in load_recording(spaced)] == [b"\x02"]


def test_a_long_run_of_junk_before_a_request_is_skipped_in_one_pass(tmp_path):
    record = tmp_path / "r.jsonl"
    record.write_text(json.dumps({"request": "0a0b", "answer": "1122", "first_byte": 0.0, "complete": 0.0}) + "\n")
    device = ReplayDevice(load_recording(record))
    writes = device.feed(b"\xff" * 100_000 + H("0a 0b"))
    assert b"".join(write.data for write in writes) == H("11 22")


async def test_each_dialin_device_records_into_its_own_file_named_by_its_id(tmp_path):
    settings = dialin_settings(
        tmp_path, protocol="custom", sharing="exchange", record=str(tmp_path / "rec" / "{id}.jsonl")
    )
    async with running_proxy(settings) as running, trio.open_nursery() as nursery:
        link = await modem(running, b"REG/7\n")
        nursery.start_soon(serve_stream, link, CustomRegister())
        device = await device_named(running, "REG/7")
        await online(device)
        address = device.config.listen[0]
        async with await trio.open_tcp_stream("127.0.0.1", address.port) as client:
            answer = await ask(client, BEEP)
        # Queued (or written) now; the proxy's stop writes what is still queued.
        recorder = device.sharing.recorder
        await wait_for(device, lambda: recorder.queued + recorder.written >= 1)
        nursery.cancel_scope.cancel()
    await link.aclose()
    [record] = load_recording(tmp_path / "rec" / "REG%2F7.jsonl")
    assert (record.request, record.answer) == (BEEP, answer)


@pytest.mark.parametrize(
    ("record", "why"),
    [("rec.jsonl", 'no "{id}" in its file name'), ("{id}/rec.jsonl", 'no "{id}" in its file name')],
)
def test_a_dialin_record_without_the_id_in_its_file_name_is_a_config_error(tmp_path, record, why):
    with pytest.raises(ConfigError, match=re.escape(why)):
        parse({"dialin": {"registry": str(tmp_path / "r.sqlite3"), "record": str(tmp_path / record)}})


def test_a_dialin_id_of_dots_or_slashes_stays_one_file_name():
    assert recording_path("rec/{id}.jsonl", "../x") == "rec/..%2Fx.jsonl"
    assert recording_path("rec/{id}", "..") == "rec/%2E%2E"
    assert recording_path("", "id") == ""
