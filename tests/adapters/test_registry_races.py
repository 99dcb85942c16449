"""Races and stuck states of the adapter registry (issue 15, hardening).

Each test drives the registry as the engine thread (`acquire`, `activate`, `between_steps`, ...)
and admin threads do, with the interleaving made deterministic: slow page-ins and slow
directory removals wait on events, racing admin calls meet at barriers. Every thread is
joined with a timeout.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from loraplex.adapters.registry import RegistryBusyError
from loraplex.engine.request import FinishReason
from tests.adapters.test_registry import (eventually, finish, make, reference_kernels, run,  # noqa: F401
                                          submit, world)  # reference_kernels (autouse), world: fixtures

WAIT = 5.0  # the longest any test here waits for another thread


def gate_reads(registry, path) -> threading.Event:
    """Page-ins of `path` wait until the returned event is set: a slow disk, on demand."""
    gate = threading.Event()
    read = registry._read

    def slow_read(entry):
        if Path(entry.path) == Path(path):
            gate.wait(WAIT)
        return read(entry)

    registry._read = slow_read
    return gate


def running(registry, name):
    """A request for `name` admitted as the engine admits one: held, paged in, running in a
    slot; returns its handle and slot."""
    handle = registry.acquire(name)
    registry.between_steps()
    slot = registry.activate(handle)
    assert slot is not None, name
    return handle, slot


def slots_used_by_one_adapter_each(registry) -> bool:
    usage = registry.usage()
    return usage["gpu_slots_used"] == usage["tier_gpu"]


# -- one adapter, one slot -----------------------------------------------------------------


def test_an_adapter_whose_slot_is_reserved_is_not_paged_into_a_second_slot(world):
    """E runs in a slot reserved for a waiter; a new request for E must wait for E's own slot,
    not copy E into the slot a slow page-in left free (E would then own two slots)."""
    _, _, _, adapters = world
    registry, _ = make(world, gpu_slots=2, host_slots=3)
    for name, path in (("G", "r0"), ("E", "r1"), ("F", "r2"), ("W", "r3")):
        registry.register(name, adapters[path])
    assert registry.info("G").tier == "disk"  # W took its host row: G pages in from disk
    gate = gate_reads(registry, adapters["r0"])
    try:
        e_first, e_slot = running(registry, "E")
        f_first, f_slot = running(registry, "F")
        w = registry.acquire("W")
        registry.between_steps()  # no slot free: E's, the least recently used, is reserved for W
        registry.release(w)
        registry.unload("W")      # W's client left and W is gone; the reservation stays while G waits
        g = registry.acquire("G")  # its read from disk hangs at the gate: F's slot is left unclaimed
        registry.deactivate(f_first)
        registry.release(f_first)  # F's slot can be evicted now
        e_second = registry.acquire("E")
        assert registry.activate(e_second) is None  # E's slot is reserved: no new sequences on it
        registry.between_steps()
        assert slots_used_by_one_adapter_each(registry), registry.usage()
        assert registry.info("F").tier == "gpu"  # nobody needed F's slot: E waits for its own

        gate.set()
        eventually(lambda: registry.info("G").tier != "disk", "G's page-in")
        registry.between_steps()  # G takes F's slot; nobody else waits, so E's slot is E's again
        assert registry.activate(e_second) == e_slot and registry.activate(g) == f_slot
        assert slots_used_by_one_adapter_each(registry) and registry.info("E").running == 2
        for handle in (e_first, e_second, g):
            registry.deactivate(handle)
            registry.release(handle)
        assert registry.info("E").tier == "gpu" and registry.info("G").tier == "gpu"
    finally:
        gate.set()
        registry.close()


# -- pins ----------------------------------------------------------------------------------


def test_racing_pins_cannot_take_every_slot(world):
    """Two `register(pin=True)` at once with two slots: one pins, one is refused, and the
    slot left over still serves other adapters."""
    _, _, _, adapters = world
    registry, engine = make(world, gpu_slots=2)
    start = threading.Barrier(2, timeout=WAIT)
    both_reading = threading.Barrier(2, timeout=0.5)  # holds the race window open
    read = registry._read

    def read_when_both_read(entry):
        try:
            both_reading.wait()
        except threading.BrokenBarrierError:
            pass  # the other register was refused before its read
        return read(entry)

    registry._read = read_when_both_read
    results = {}

    def register_pinned(name, path):
        start.wait()
        try:
            results[name] = registry.register(name, path, pin=True).pinned
        except RegistryBusyError as exc:
            results[name] = exc

    threads = [threading.Thread(target=register_pinned, args=(name, adapters[path]))
               for name, path in (("P1", "r0"), ("P2", "r1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    pinned = [name for name, result in results.items() if result is True]
    refused = [name for name, result in results.items() if isinstance(result, RegistryBusyError)]
    assert len(pinned) == 1 and len(refused) == 1, results
    assert registry.names() == pinned  # the refused one left nothing behind
    registry._read = read
    registry.register("other", adapters["r2"])
    req = submit(engine, "other", "other")
    run(engine)
    assert finish(req) is FinishReason.LENGTH


def step_until_finished(engine, req, seconds=WAIT) -> None:
    deadline = time.monotonic() + seconds
    while finish(req) is None:
        assert time.monotonic() < deadline, f"{req.request_id} still waits"
        engine.step()
        time.sleep(0.001)


def test_a_request_no_slot_can_ever_serve_ends_after_a_bounded_wait(world):
    """Waiting for a busy slot is fine however long it takes; waiting while every slot holds a
    pinned adapter would last forever, so it ends with an error after `slot_wait_timeout_s`."""
    _, _, _, adapters = world
    bound = 0.2
    registry, engine = make(world, gpu_slots=2, slot_wait_timeout_s=bound)
    registry.register("P", adapters["r0"], pin=True)
    registry.register("Q", adapters["r1"])
    registry.register("B", adapters["r2"])
    long_q = submit(engine, "long-q", "Q", n=12)
    for _ in range(3):
        engine.step()
    b = submit(engine, "b", "B")
    engine.step()
    time.sleep(2 * bound)  # B waits for Q's busy slot longer than the bound: that is no reason to fail
    run(engine)
    assert finish(long_q) is FinishReason.LENGTH
    assert finish(b) is FinishReason.LENGTH

    # the pin limit (slots - 1) keeps this from happening through the API; the bound is the
    # backstop for whatever else would leave every slot pinned (B now sits in the second slot)
    handle = registry.acquire("B")
    handle.pinned = True
    registry.release(handle)
    stuck = submit(engine, "stuck", "Q")
    started = time.monotonic()
    step_until_finished(engine, stuck)
    assert time.monotonic() - started >= bound
    assert finish(stuck) is FinishReason.ERROR and "cannot get a GPU slot" in stuck.outputs[-1].error
    assert registry.info("Q").refcount == 0

    registry.pin("B", False)  # an admin unpins: Q is served again
    again = submit(engine, "again", "Q")
    run(engine)
    assert finish(again) is FinishReason.LENGTH


# -- merged directories ----------------------------------------------------------------------


def test_merged_directories_are_removed_off_the_engine_thread_and_outside_the_lock(world, monkeypatch):
    _, _, _, adapters = world
    registry, _ = make(world)
    registry.register("r0", adapters["r0"])
    merged = Path(registry.merge("mix", "cat", [("r0", 1.0)]).path)
    handle = registry.acquire("mix")  # a request still holds it
    registry.unload("mix")
    removing, proceed = threading.Event(), threading.Event()
    removed_on = []
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        if Path(path) == merged:
            removed_on.append(threading.current_thread().name)
            removing.set()
            proceed.wait(WAIT)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    try:
        started = time.monotonic()
        registry.release(handle)  # as the engine thread does when the last request ends
        assert time.monotonic() - started < 1.0  # it did not wait for the removal
        assert removing.wait(WAIT) and removed_on[0].startswith("loraplex-adapter-io")
        reader = threading.Thread(target=registry.usage)  # takes the registry lock
        reader.start()
        reader.join(1.0)
        assert not reader.is_alive()  # the lock is free while the directory goes
        assert merged.exists()
    finally:
        proceed.set()
    eventually(lambda: not merged.exists(), "the merged directory's removal")
    registry.close()


def test_every_later_read_of_a_client_named_adapter_stays_inside_its_roots(world, tmp_path):
    """Checked once at registration was not enough: a file swapped for a link out of the roots
    afterwards was read at the next page-in, merge or export."""
    import pytest

    from loraplex.adapters.peft_format import AdapterError

    root, _, _, adapters = world
    inside = tmp_path / "root"
    shutil.copytree(adapters["r0"], inside / "r0")
    registry, _ = make(world)
    registry.register("client", inside / "r0", roots=[inside])
    assert registry.export("client", tmp_path / "out").exists()  # a read inside the roots
    config = inside / "r0" / "adapter_config.json"
    config.unlink()
    config.symlink_to(adapters["r1"] / "adapter_config.json")  # the same format, outside every root
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):
        registry.export("client", tmp_path / "out2")
    registry.register("trusted", adapters["r2"])  # the operator's --adapter: no roots, links allowed
    registry.close()


def test_a_merge_is_bounded_before_its_sources_are_read(world):
    import pytest

    from loraplex.adapters.merge import MAX_MERGE_SOURCES
    from loraplex.adapters.peft_format import AdapterError

    _, _, _, adapters = world
    registry, _ = make(world)
    registry.register("r0", adapters["r0"])
    reads = []
    read = registry._read
    registry._read = lambda entry: reads.append(entry.name) or read(entry)
    with pytest.raises(AdapterError, match=f"at most {MAX_MERGE_SOURCES} sources"):
        registry.merge("huge", "linear", [("r0", 1.0)] * (MAX_MERGE_SOURCES + 1))
    assert reads == []
    registry.close()
