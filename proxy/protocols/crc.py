"""CRC-8, MSB first, no reflection and no final XOR: ATOL v3 (poly 0x31, init 0xFF) and Energomera CE (0xB5, 0)."""

from __future__ import annotations


def crc8(data: bytes, polynomial: int, initial: int) -> int:
    crc = initial
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ polynomial) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc
