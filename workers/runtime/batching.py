"""Gathering the jobs of one stage that a worker has claimed into batches.

pgqueuer hands a worker's claimed jobs to one task each. Each task submits its job here and
waits; the jobs submitted in the same turn of the event loop (one dequeue) leave together as
one batch, so a lone job never waits for company, and jobs that arrive while a batch runs
form the next one. At most `max_running` batches of a stage run at once in a worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")

# How a runner says that one item of its batch is done before the batch is: the item's place
# in the batch, and None (done) or the exception to raise for it.
Report = Callable[[int, BaseException | None], None]
# A batch's runner: the items in, per item None (done) or the exception to raise for it. An
# item it reported already keeps what was reported.
BatchRunner = Callable[[list[J], Report], Awaitable[Sequence[BaseException | None]]]


@dataclass
class Batcher(Generic[J]):
    run: BatchRunner[J]
    key: Callable[[J], Hashable]  # items with the same key never share a batch
    max_size: int
    max_running: int = 2
    _waiting: list[tuple[J, asyncio.Future[None]]] = field(default_factory=list)
    _running: int = 0
    _scheduled: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def submit(self, item: J) -> None:
        """Run `item` in the next batch; raises what its batch says it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((item, future))
        if not self._scheduled:
            # After the tasks already ready to run (the rest of this dequeue) have submitted.
            self._scheduled = True
            loop.call_soon(self._start)
        await future

    def _start(self) -> None:
        self._scheduled = False
        while self._waiting and self._running < self.max_running:
            batch = self._take()
            if not batch:  # every waiting job was cancelled
                break
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[J, asyncio.Future[None]]]:
        batch: list[tuple[J, asyncio.Future[None]]] = []
        keys: set[Hashable] = set()
        rest: list[tuple[J, asyncio.Future[None]]] = []
        for entry in self._waiting:
            key = self.key(entry[0])
            if entry[1].done():  # its task was cancelled while waiting
                continue
            if len(batch) < self.max_size and key not in keys:
                batch.append(entry)
                keys.add(key)
            else:
                rest.append(entry)
        self._waiting = rest
        return batch

    async def _run(self, batch: list[tuple[J, asyncio.Future[None]]]) -> None:
        def settle(place: int, outcome: BaseException | None) -> None:
            future = batch[place][1]
            if future.done():
                return
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)

        try:
            outcomes = await self.run([item for item, _ in batch], settle)
            for place, outcome in enumerate(outcomes):
                settle(place, outcome)
        except BaseException as exc:  # a bug in the runner: every item of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            if self._waiting and not self._scheduled:
                self._start()
