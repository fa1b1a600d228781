"""The engine under real faults: its process SIGKILLed mid-alert or stopped, a gateway's
connection dropped, redis-server SIGKILLed, Redis connections killed or cut right after
a transaction. Each scenario (``tests/faults.py``) runs the engine and Redis as child
processes and checks, device by device against the oracle, that an accepted alert is
never lost and that nobody is notified twice but devices of batches that were not acked
when the fault struck.

About 10 s a scenario: engines start as processes, stages last one or two seconds, and
the gateways are slow on purpose so that batches are unacked when the fault strikes.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import faults
import grpc
import numpy as np
import pyarrow as pa
import pytest

from engine import client
from engine.journal import Journal, Op, StoreUnavailable

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (make redis-server)",
)

#: 40,000 devices around Beijing: about 7,500 within the 6 km of the last ring, in
#: batches of 100 so that a slow gateway has many of them in flight.
SCALE = faults.Scale()


def passed(result: faults.Result) -> faults.Result:
    """Fails with every check of the scenario that did not hold."""
    assert not result.failures, f"{result.fault}:\n  " + "\n  ".join(result.failures)
    assert result.expected > 0 and result.lost == 0
    return result


@pytest.mark.parametrize("snapshot", [False, True], ids=["re-reported", "snapshot"])
def test_an_engine_killed_mid_stage_resumes_on_its_timeline_and_loses_nobody(tmp_path, snapshot):
    result = passed(faults.engine_killed_mid_stage(tmp_path, SCALE, snapshot=snapshot))
    # The kill struck with batches handed over and not acked: the bound was exercised.
    assert result.duplicates_allowed > 0
    assert result.duplicated <= result.duplicates_allowed


def test_an_alert_accepted_just_before_a_kill_reaches_everyone_once(tmp_path):
    result = passed(faults.engine_killed_after_create(tmp_path, SCALE))
    assert result.duplicated == 0


def test_a_gateway_that_dies_mid_stream_gets_every_unacked_message_again(tmp_path):
    result = passed(faults.gateway_dropped_mid_stream(tmp_path, SCALE))
    assert result.details["unacked_at_drop"] > 0
    assert 0 < result.duplicated <= result.duplicates_allowed


def test_while_redis_is_down_alerts_are_refused_at_once_and_nothing_is_lost(tmp_path):
    result = passed(faults.redis_killed(tmp_path, SCALE))
    assert result.duplicated == 0
    assert result.details["create_refused_s_first_write"] < 2.0


def test_killed_redis_connections_apply_no_transaction_twice(tmp_path):
    result = passed(faults.redis_connections_cut(tmp_path, SCALE))
    assert result.duplicated == 0


def test_a_transaction_whose_reply_was_lost_is_not_written_again(tmp_path):
    result = passed(faults.redis_reply_lost(tmp_path, SCALE))
    assert result.details["cuts"] >= 2
    assert result.duplicated == 0


def test_a_graceful_restart_brings_the_devices_back_from_the_snapshot(tmp_path):
    result = passed(faults.engine_restarted_gracefully(tmp_path, SCALE))
    assert result.duplicated == 0


def test_a_change_refused_while_queued_behind_a_failed_write_is_never_written(tmp_path):
    """The journal alone against a redis-server it loses: a change whose caller waits is
    queued behind a write that fails; the caller is told UNAVAILABLE at once, and once
    Redis is back the change is dropped while the write ahead of it is applied once."""
    store = faults.RedisServer(tmp_path / "redis")
    store.start()

    async def scenario() -> tuple[float, BaseException | None]:
        journal = Journal(store.url)
        await journal.start()
        store.kill()
        journal.submit(Op(commands=[("incr", "ahead")]))
        for _ in range(3):  # the writer takes that change and starts writing it
            await asyncio.sleep(0)
        started = time.monotonic()
        try:
            await journal.commit(Op(commands=[("set", "refused", 1)]))
            error = None
        except StoreUnavailable as refused:
            error = refused
        took = time.monotonic() - started
        await asyncio.to_thread(store.start)
        await journal.close(timeout_s=20)
        return took, error

    try:
        took, error = asyncio.run(scenario())
        assert isinstance(error, StoreUnavailable)
        assert took < 2.0
        assert store.client.get("ahead") == b"1"
        assert store.client.get("refused") is None
    finally:
        store.stop()


def test_devices_forgotten_while_queued_stay_forgotten_after_a_kill(tmp_path):
    """ForgetDevices takes the devices out of messages no gateway has taken yet; the
    messages' copies in Redis still hold them, so a restarted engine must drop them
    again, and then forget the list once the queue is empty."""
    with faults.Rig(tmp_path, SCALE) as rig:
        rig.start(connect=False)  # nobody takes the messages: they stay queued
        radius = SCALE.stages()[0][0]
        rig.create("forget-queued", [(radius, 600)])
        faults.wait_until(
            lambda: (
                (a := rig.engine.get("forget-queued")).stages[0].swept
                and a.stages[0].recipients > 0
            ),
            what="the sweep",
        )
        must, _ = rig.devices.within(radius, 1)
        forgotten = must[::3]
        reporter = rig.engine.channel("dev-reporter-1")
        assert client.forget(reporter, 1, forgotten) == forgotten.size

        rig.engine.kill()
        rig.engine.start()
        faults.connect_all(rig.gateways, rig.engine)
        key = "tuanyuan:gateway:1:forgotten"
        assert rig.redis.client.exists(key), "the list survives until the queue is empty"
        faults.wait_until(
            lambda: (
                faults.all_acked(rig.engine.get("forget-queued"))
                and not rig.redis.client.exists(key)
            ),
            what="delivery to gateway 1 and the list deleted",
        )
        got = rig.gateways[1].ids("forget-queued")
        assert not np.isin(forgotten, got).any(), "a forgotten device was notified"
        assert np.isin(np.setdiff1d(must, forgotten), got).all(), "the others all came"


def test_a_resolve_after_a_kill_follows_up_what_was_handed_over_and_withdraws_the_rest(
    tmp_path,
):
    result = passed(faults.engine_killed_before_resolve(tmp_path, SCALE))
    assert result.details["held_at_kill"] > 0 and result.details["withdrawn"] > 0
    assert result.duplicated == result.duplicates_allowed == result.expected


def test_devices_forgotten_while_redis_is_down_leave_the_snapshot_and_the_retry_finishes(
    tmp_path,
):
    """ForgetDevices while Redis is down: the devices leave memory and the snapshot file
    at once; the call answers UNAVAILABLE because the queued messages that hold them
    cannot be changed durably; those messages are not sent meanwhile. Once Redis is
    back, the retry finishes the work, and no forgotten device is ever notified."""
    with faults.Rig(tmp_path, SCALE, snapshot=True) as rig:
        rig.start(connect=False)  # nobody takes the messages: they stay queued
        radius = SCALE.stages()[0][0]
        rig.create("forget-outage", [(radius, 600)])
        faults.wait_until(lambda: rig.engine.get("forget-outage").stages[0].swept, what="the sweep")
        must, _ = rig.devices.within(radius, 1)
        forgotten = must[::3]
        reporter = rig.engine.channel("dev-reporter-1")

        rig.redis.kill()
        with pytest.raises(grpc.RpcError) as refused:
            client.forget(reporter, 1, forgotten)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "in the snapshot" in refused.value.details()
        kept = pa.ipc.open_file(str(rig.snapshot)).read_all().column("device_id").to_numpy()
        assert not np.isin(forgotten, kept).any(), "the snapshot still holds them"
        faults.connect_all(rig.gateways, rig.engine)
        time.sleep(0.5)
        sent = rig.gateways[1].ids("forget-outage")
        assert not np.isin(forgotten, sent).any(), "a message holding them was sent"

        rig.redis.start()
        faults.wait_until(
            lambda: rig.engine.health() == faults.SERVING, what="Redis reachable again"
        )
        client.forget(reporter, 1, forgotten)
        faults.wait_until(
            lambda: faults.all_acked(rig.engine.get("forget-outage")), what="delivery"
        )
        got = rig.gateways[1].ids("forget-outage")
        assert not np.isin(forgotten, got).any(), "a forgotten device was notified"
        assert np.isin(np.setdiff1d(must, forgotten), got).all(), "the others all came"
