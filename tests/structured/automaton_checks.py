"""Checks shared by the byte-automaton tests (regex, structural tags, ...)."""

from __future__ import annotations

import random


def check_min_close_is_exact(auto, seed: int, max_states: int, only_closable: bool = False) -> None:
    """``min_close`` is exact on the states a random exploration reaches: 0 exactly on complete states, some byte
    lowers it by one, none by more. (By induction that is the fewest bytes to a valid output, which the budget
    logic relies on to close in time.) ``only_closable``: do not explore states that can no longer close."""
    rng = random.Random(seed)
    frontier, seen = [auto.start()], set()
    while frontier and len(seen) < max_states:
        s = frontier.pop(rng.randrange(len(frontier)))
        if s in seen:
            continue
        seen.add(s)
        here = auto.min_close(s)
        assert (here == 0) == auto.complete(s)
        nexts = [n for n in (auto.step(s, b) for b in range(256)) if n is not None]
        closer = [auto.min_close(n) for n in nexts]
        assert all(c >= here - 1 for c in closer)
        if here:
            assert here - 1 in closer, (s, here, sorted(set(closer)))
        frontier.extend(n for n in nexts if not only_closable or auto.min_close(n) < float("inf"))
