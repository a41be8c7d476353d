"""docs/protocols.md's worked examples are what the framers and checksums say: the docs cannot drift.

Each fenced block whose info string is `frame PROTOCOL host|device [text|xor|sum]` holds one message
(hex bytes, or ASCII with `text`); it must be exactly one complete frame for that side's framer, and its
checksum must be right (for IEC 61107, by the method the block names).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.protocols import NAMES, Frame, atol2, atol3, coges, custom, dle, get, iec61107, shtrih
from proxy.protocols import energomera_ce as ce

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocols.md"
README = ROOT / "README.md"

BLOCK = re.compile(r"^```frame (\S+) (host|device)(?: (text|xor|sum))?\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str, str | None, bytes]]:
    found = []
    for match in BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        protocol, side, option, body = match.groups()
        data = body.rstrip("\n").encode("ascii") if option == "text" else bytes.fromhex(body)
        found.append((protocol, side, option, data))
    return found


EXAMPLES = examples()


def dle_checksum_ok(frame: bytes) -> bool:
    """The simulator's sum over NUM..DATA, undoubled (the real algorithm is unknown, see the doc)."""
    body = frame[2:-3].replace(b"\x10\x10", b"\x10")
    return frame[-1] == dle.checksum(body)


def iec_checksum_ok(frame: bytes, method: str | None) -> bool:
    """A block's BCC by the method its doc block names; a line (sign-on, identification, option
    select) has none and names none."""
    if frame[:1] not in (b"\x01", b"\x02"):
        return method is None and frame.endswith(b"\r\n")
    if method == "xor":
        return frame[-1] == iec61107.bcc_xor(frame[1:-1])
    return method == "sum" and frame[-1] == iec61107.bcc_sum(frame[1:-1])


def checksum_ok(protocol: str, side: str, option: str | None, frame: bytes) -> bool:
    """True when `frame`'s checksum is right; the decoders raise ProtocolError when it is not."""
    if protocol == "dle":
        return dle_checksum_ok(frame)
    if protocol == "iec61107":
        return iec_checksum_ok(frame, option)
    decoders = {
        "custom": custom.decode,
        "shtrih": shtrih.decode,
        "atol2": atol2.decode,
        "atol3": atol3.decode,
        "coges": coges.decode,
        "energomera-ce": lambda raw: ce.decode(raw, request=side == "host"),
    }
    decoders[protocol](frame)
    return True


def test_every_frame_block_is_read():
    """A mistyped info string would otherwise leave its example unchecked."""
    opened = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("```frame")]
    assert len(opened) == len(EXAMPLES)


def test_every_framed_protocol_has_worked_examples_in_the_docs():
    documented = {protocol for protocol, *_ in EXAMPLES}
    assert documented <= set(NAMES)
    assert documented == set(NAMES) - {"raw"}


@pytest.mark.parametrize(
    ("protocol", "side", "option", "frame"),
    EXAMPLES,
    ids=[f"{protocol}-{side}-{frame[:12].hex()}" for protocol, side, _, frame in EXAMPLES],
)
def test_worked_example_is_one_frame_with_a_valid_checksum(protocol, side, option, frame):
    definition = get(protocol)
    framer = definition.host_framer() if side == "host" else definition.device_framer()
    assert framer.feed(frame) == [Frame(frame)]
    assert framer.pending == 0
    assert checksum_ok(protocol, side, option, frame)


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_docs_links_into_readme_resolve():
    headings = [line.lstrip("#") for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    anchors = {github_anchor(heading) for heading in headings}
    links = re.findall(r"\]\(\.\./README\.md#([^)]+)\)", DOC.read_text(encoding="utf-8"))
    assert links
    assert set(links) <= anchors


def test_readme_points_users_at_the_docs_they_have():
    text = README.read_text(encoding="utf-8")
    assert "../shared/" not in text
    assert "docs/protocols.md" in text
