"""Small trio helpers shared by broker and peer (internal)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

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


class OwnNursery:
    """``async with obj:`` runs ``obj.run`` in a nursery the block owns.

    Entering returns once ``run`` has reported started; leaving calls ``_end_of_block()``
    (which asks ``run`` to finish) and waits for it. An error from ``run`` comes out as
    itself, not wrapped in an exception group, when it is the only one.
    """

    _cm_nursery: Any = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError  # pragma: no cover

    def _end_of_block(self) -> None:
        raise NotImplementedError  # pragma: no cover

    async def __aenter__(self) -> Self:
        mgr = trio.open_nursery()
        nursery = await mgr.__aenter__()
        self._cm_nursery = mgr
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            self._cm_nursery = None
            try:
                await mgr.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                raise_single(group)
                raise
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        mgr, self._cm_nursery = self._cm_nursery, None
        self._end_of_block()
        try:
            return await mgr.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]
        except BaseExceptionGroup as group:
            raise_single(group)
            raise
