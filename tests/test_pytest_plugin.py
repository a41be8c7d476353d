"""The pytest plugin, through its pytest11 entry point, in pytest subprocesses (pytester)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]

FAILING = """
import os

BEEP = bytes.fromhex("01 05 00 13 3F 42 0F 00 A8")


def read(fd, count):
    data = b""
    while len(data) < count:
        data += os.read(fd, count - len(data))
    return data


def test_fails_after_a_beep(simulated_device):
    register = simulated_device("custom")
    fd = os.open(register.path, os.O_RDWR | os.O_NOCTTY)
    os.write(fd, BEEP)
    assert read(fd, 9)[:1] == b"\\x06"
    os.close(fd)
    assert register.exchanges == [], "deliberately failing"


def test_passes(simulated_device):
    simulated_device("custom", tcp=True)


def test_without_devices():
    assert False, "no device here"
"""


def test_a_failing_test_s_report_shows_the_device_s_exchanges(pytester):
    pytester.makepyfile(test_pos=FAILING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*- devproxy simulated device 1 (custom) -*",
            "simulated custom device on */ttyCUSTOM (Faults(*",
            "+*s host: 01 05 00 13 3f 42 0f 00 a8 -> device: 06 | 01 04 00 13 00 00 63 7a*",
        ]
    )
    assert result.stdout.str().count("devproxy simulated device") == 1  # not for the test without one


def test_the_plugin_is_inert_unless_asked_for(pytester):
    pytester.makepyfile(
        test_plain="""
        import threading

        def test_nothing_started(request):
            assert threading.active_count() == 1
            assert "simulated_device" not in request.fixturenames
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trace-config")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*devproxy*proxy*pytest_plugin*"])


def test_the_ci_example_passes(pytester):
    pytester.makepyfile(test_register_example=(ROOT / "contrib" / "ci" / "test_register_example.py").read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
