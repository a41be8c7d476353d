"""CRC-8, MSB first, no reflection and no final XOR: ATOL v3 (poly 0x31, init 0xFF) and Energomera CE (0xB5, 0)."""

from __future__ import annotations

from functools import cache


@cache
def _table(polynomial: int) -> bytes:
    """The CRC of every byte value from 0, so a message costs one lookup a byte instead of eight shifts."""
    table = bytearray(256)
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = ((crc << 1) ^ polynomial) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table[value] = crc
    return bytes(table)


def crc8(data: bytes, polynomial: int, initial: int) -> int:
    table = _table(polynomial)
    crc = initial
    for byte in data:
        crc = table[crc ^ byte]
    return crc
