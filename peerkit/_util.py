"""Small trio helpers shared by broker and peer (internal)."""

from __future__ import annotations

import trio


def raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """If ``group`` holds exactly one non-Cancelled error, raise that error instead.

    Otherwise return, and the caller re-raises the group.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    if len(leaves) == 1:
        raise leaves[0] from None
