"""Stop sequences in streamed text: where one matched, and how much of the text must be held
back because it could still grow into one (so no client ever sees part of a stop)."""

from __future__ import annotations


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop sequence in `text`: (index, the sequence), or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def held_back(text: str, stops: list[str], longest: int) -> int:
    """How many trailing characters could still grow into a stop sequence."""
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0
