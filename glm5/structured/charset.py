"""Sets of Unicode code points as sorted, merged ``(low, high)`` ranges: the character classes of the regex and
GBNF grammars."""

from __future__ import annotations

MAX_CP = 0x10FFFF

Ranges = tuple[tuple[int, int], ...]


def normalise(ranges) -> Ranges:
    """Sorted, merged, clipped to Unicode, surrogates removed (they have no UTF-8 encoding, so no output can
    contain them)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), min(hi, MAX_CP))):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return tuple(out)


def complement(ranges) -> Ranges:
    """Every code point not in ``ranges``."""
    out, nxt = [], 0
    for lo, hi in normalise(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return normalise(out)


def subtract(ranges, remove) -> Ranges:
    """The code points of ``ranges`` that are not in ``remove``."""
    keep = complement(remove)
    return normalise([(max(a, c), min(b, d)) for a, b in ranges for c, d in keep if max(a, c) <= min(b, d)])
