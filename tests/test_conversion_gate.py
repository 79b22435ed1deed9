"""ConversionGate on its own: single flight, shared failures, backoff growth, refusals."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from stargzfs.conversion.gate import ConversionGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_run() -> None:
    gate = ConversionGate(1.0, 10.0)
    runs = 0
    release = trio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(gate.run, "k", work)
        await trio.testing.wait_all_tasks_blocked()
        assert runs == 1 and gate.in_flight("k")
        release.set()
    # each waiter re-ran `work` after the first run: cheap in real use (the output exists)
    assert runs == 5 and not gate.in_flight("k")


async def test_waiters_share_the_failure_and_the_backoff_stops_new_runs() -> None:
    clock = Clock()
    gate = ConversionGate(5.0, 20.0, clock=clock)
    runs = 0
    release = trio.Event()

    async def failing() -> None:
        nonlocal runs
        runs += 1
        await release.wait()
        gate.failed("k", "registry down")
        raise OSError(errno.EIO, "registry down")

    outcomes: list[int] = []

    async def caller() -> None:
        try:
            await gate.run("k", failing)
        except OSError as exc:
            outcomes.append(exc.errno)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert runs == 1 and outcomes == [errno.EIO] * 3
    with pytest.raises(OSError, match="registry down") as refused:
        gate.check("k")
    assert refused.value.errno == errno.EIO
    clock.now += 5.0
    gate.check("k")  # backoff over: a new attempt may start


def test_backoff_doubles_up_to_the_maximum_and_success_resets_it() -> None:
    clock = Clock()
    gate = ConversionGate(5.0, 12.0, clock=clock)
    assert [gate.failed("k", "x") for _ in range(4)] == [5.0, 10.0, 12.0, 12.0]
    gate.succeeded("k")
    gate.check("k")
    assert gate.failed("k", "x") == 5.0
    gate.check("other")  # keys are independent


def test_refusal_keeps_its_errno() -> None:
    gate = ConversionGate(5.0, 12.0, clock=Clock())
    gate.refuse("k", "malformed TOC", errno.EIO)
    with pytest.raises(OSError) as refused:
        gate.check("k")
    assert (refused.value.errno, refused.value.strerror) == (errno.EIO, "malformed TOC")


def test_refusal_is_remembered_as_enoent_and_clears_a_backoff() -> None:
    gate = ConversionGate(5.0, 12.0, clock=Clock())
    gate.failed("k", "flaky")
    gate.refuse("k", "not eStargz: plain layer")
    assert gate.refusal("k") == (errno.ENOENT, "not eStargz: plain layer")
    with pytest.raises(OSError) as refused:
        gate.check("k")
    assert refused.value.errno == errno.ENOENT and "plain layer" in str(refused.value)


async def test_a_cancelled_run_releases_its_waiters_with_eio() -> None:
    gate = ConversionGate(1.0, 10.0)
    started = trio.Event()

    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    errors: list[int] = []

    async def waiter() -> None:
        try:
            await gate.run("k", forever)
        except OSError as exc:
            errors.append(exc.errno)

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def owner() -> None:
            with scope:
                await gate.run("k", forever)

        nursery.start_soon(owner)
        await started.wait()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert errors == [errno.EIO] and not gate.in_flight("k")
