"""One engine writes under a Redis key prefix at a time: the journal's lease, against a
real redis-server. A second engine is refused with the holder named; a lapsed lease, or
one of a process of this host that is gone, is taken; an engine whose prefix another
took writes nothing more and stops."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys

import faults
import pytest

from engine.journal import Journal, Op, PrefixTaken

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (make redis-server)",
)

OWNER = "tuanyuan:owner"
#: A lease short enough that waiting for one to lapse takes a second or two.
LEASE_S = 0.5


@pytest.fixture
def store(tmp_path):
    server = faults.RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def gone_pid() -> int:
    """The id of a process of this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_engine_on_the_prefix_is_refused_with_the_holder_named(store):
    async def scenario() -> None:
        first = Journal(store.url, lease_s=LEASE_S)
        await first.start()
        second = Journal(store.url, lease_s=LEASE_S)
        with pytest.raises(PrefixTaken) as refused:
            await second.start()
        message = str(refused.value)
        assert "--redis-prefix" in message and socket.gethostname() in message
        # The first goes on writing; an engine on another prefix starts at once.
        await first.commit(Op(commands=[("set", "after", 1)]))
        other = Journal(store.url, prefix="other:", lease_s=LEASE_S)
        await other.start()
        await other.close()
        await first.close()

    asyncio.run(scenario())
    assert store.client.get("after") == b"1"


def test_a_lease_that_lapses_is_taken(store):
    store.client.set(OWNER, "elsewhere 4242 token", px=300)

    async def scenario() -> bytes:
        journal = Journal(store.url, lease_s=LEASE_S)
        await journal.start()
        holder = store.client.get(OWNER)
        await journal.close()
        return holder

    holder = asyncio.run(scenario())
    assert holder.startswith(socket.gethostname().encode() + b" ")


def test_the_lease_of_a_process_of_this_host_that_is_gone_is_taken_at_once(store):
    # Renewed by nobody, it would outlast the test: only taking it over lets the
    # journal start.
    store.client.set(OWNER, f"{socket.gethostname()} {gone_pid()} token", px=600_000)

    async def scenario() -> None:
        journal = Journal(store.url, lease_s=LEASE_S)
        await journal.start()
        await journal.commit(Op(commands=[("set", "written", 1)]))
        await journal.close()

    asyncio.run(scenario())
    assert store.client.get("written") == b"1"


def test_an_engine_whose_prefix_was_taken_writes_nothing_more(store):
    told: list[str] = []

    async def scenario() -> None:
        journal = Journal(store.url, lease_s=LEASE_S, on_taken=told.append)
        await journal.start()
        await journal.commit(Op(commands=[("set", "before", 1)]))
        store.client.set(OWNER, "elsewhere 4242 token", px=600_000)
        with pytest.raises(PrefixTaken):
            await journal.commit(Op(commands=[("set", "after", 1)]))
        assert not journal.available
        with pytest.raises(PrefixTaken):
            await journal.commit(Op(commands=[("set", "later", 1)]))
        journal.submit(Op(commands=[("set", "submitted", 1)]))
        await journal.close(timeout_s=1.0)

    asyncio.run(scenario())
    assert store.client.get("before") == b"1"
    assert store.client.mget("after", "later", "submitted") == [None, None, None]
    assert len(told) == 1 and "process 4242 on elsewhere" in told[0]
    assert store.client.get(OWNER) == b"elsewhere 4242 token", "the new holder keeps it"


def test_an_idle_engine_keeps_its_lease_and_gives_it_up_at_shutdown(store):
    async def scenario() -> tuple[bytes, bytes]:
        journal = Journal(store.url, lease_s=1.0)
        await journal.start()
        held = store.client.get(OWNER)
        await asyncio.sleep(3.0)  # three times the lease, renewed every third of it
        still = store.client.get(OWNER)
        await journal.close()
        return held, still

    held, still = asyncio.run(scenario())
    assert held is not None and still == held
    assert store.client.get(OWNER) is None


def test_a_serving_engine_whose_prefix_is_taken_exits_with_the_reason(tmp_path, store):
    engine = faults.Engine(tmp_path / "engine", store.url, batch_devices=100)
    engine.start()
    try:
        store.client.set(OWNER, "elsewhere 4242 token", px=600_000)
        # The next renewal, a third of the lease after the last write, finds it.
        assert engine.process.wait(30) == 1
    finally:
        engine.close()
    log = engine.log.read_text()
    assert "process 4242 on elsewhere, took the prefix 'tuanyuan:'" in log
    assert "Traceback" not in log
