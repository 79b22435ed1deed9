"""One conversion per key at a time, a growing pause after failures, refusals remembered.

The FUSE layer may ask for the same output from many requests at once (a parallel `ls -l`,
several containers of one image); the registry and the builder must see one attempt, and
after a failure no attempt at all until the backoff has passed, however many lookups come.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import trio


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


@dataclass
class _Failure:
    attempts: int
    retry_at: float
    message: str


class ConversionGate:
    """Single-flight + backoff + "not convertible" memory, for any hashable key."""

    def __init__(self, backoff: float, backoff_max: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._clock = clock
        self._flights: dict[Hashable, _Flight] = {}
        self._failures: dict[Hashable, _Failure] = {}
        self._refused: dict[Hashable, tuple[int, str]] = {}

    def refusal(self, key: Hashable) -> tuple[int, str] | None:
        """(errno, why) when `key` was refused for good."""
        return self._refused.get(key)

    def refuse(self, key: Hashable, reason: str, code: int = errno.ENOENT) -> None:
        self._refused[key] = (code, reason)
        self._failures.pop(key, None)

    def check(self, key: Hashable) -> None:
        """OSError with the refusal's errno for a refused key, EIO while a failure's backoff lasts."""
        refused = self._refused.get(key)
        if refused is not None:
            raise OSError(*refused)
        failure = self._failures.get(key)
        if failure is not None and self._clock() < failure.retry_at:
            raise OSError(errno.EIO, failure.message)

    def failed(self, key: Hashable, message: str) -> float:
        """Start (or lengthen) the backoff of `key`; returns the wait in seconds."""
        previous = self._failures.get(key)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.backoff * 2 ** (attempts - 1), self.backoff_max)
        self._failures[key] = _Failure(attempts, self._clock() + delay, message)
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, work: Callable[[], Awaitable[None]]) -> None:
        """`work` once `check` allows it, never twice at once per key.

        A caller that found another caller's run in flight waits for it and shares its
        failure; after a success it checks again and runs `work` itself, which is then
        normally cheap (the output exists, or a copy of another snapshot's output).
        """
        while True:
            self.check(key)
            if await self._single_flight(key, work):
                return

    async def _single_flight(self, key: Hashable, work: Callable[[], Awaitable[None]]) -> bool:
        """True when this call ran `work`, False when it waited for another caller's run."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise OSError(flight.error.errno, flight.error.strerror)
            return False
        flight = _Flight()
        self._flights[key] = flight
        try:
            await work()
        except OSError as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.error = OSError(errno.EIO, "conversion interrupted")
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return True
