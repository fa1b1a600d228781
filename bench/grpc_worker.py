"""The child processes of ``python -m bench.grpc``: partner apps and push gateways.

Each runs in a fresh process (multiprocessing, spawn) and talks to the parent over a
``Pipe``: it prepares what it needs, says it is ready, then waits for commands. Times
are ``time.monotonic()`` readings; CLOCK_MONOTONIC is one clock for the whole machine,
so the parent compares them across processes.

- :func:`reporter`: a partner app streaming its share of the population through
  ``ReportLocations``, one stream per pass, every batch encoded before the clock starts.
- :func:`paced_reporter`: the partner apps sending prepared batches at a fixed pace, one
  stream per gateway, recording when each batch was handed to gRPC.
- :func:`gateway`: a push gateway that records when each message arrives and acks it
  at once; on ``dump`` it writes what it received to a ``.npz`` file.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np

from engine import client
from engine.api import gateway_pb2


def channel(port: int, token: str | None) -> grpc.Channel:
    """A channel to the engine on loopback, with the party's bearer token when the
    engine asks for one (``token`` None: an engine without credentials)."""
    target = f"127.0.0.1:{port}"
    opened = client.connect(target) if token is None else client.connect(target, token=token)
    grpc.channel_ready_future(opened).result(timeout=60)
    return opened


def _summary(summary) -> dict[str, int]:
    return {
        "batches": summary.batches,
        "reports": summary.reports,
        "added": summary.added,
        "updated": summary.updated,
        "stale": summary.stale,
        "geofence_recipients": summary.geofence_recipients,
    }


def reporter(
    port: int, token: str | None, gateway: int, arrays: dict[str, str], batch: int, conn
) -> None:
    """One partner app: its devices from the parent's ``.npy`` files, every pass encoded
    up front; then, per ``(pass name)`` command, one ``ReportLocations`` stream of that
    pass, answered with its first-send and summary times. ``None`` ends the process."""
    rows = np.flatnonzero(np.load(arrays["gateway"], mmap_mode="r") == gateway)
    ids = np.load(arrays["device_id"], mmap_mode="r")[rows]
    started = time.perf_counter()
    passes: dict[str, list[bytes]] = {}
    for name in ("load", "move"):
        lat = np.load(arrays[f"{name}_lat"], mmap_mode="r")[rows]
        lng = np.load(arrays[f"{name}_lng"], mmap_mode="r")[rows]
        passes[name] = [
            client.encode_batch(gateway, ids[s : s + batch], lat[s : s + batch], lng[s : s + batch])
            for s in range(0, ids.size, batch)
        ]
    encode_s = time.perf_counter() - started
    stream = channel(port, token)
    conn.send(
        {
            "gateway": gateway,
            "devices": int(ids.size),
            "batches": len(passes["load"]),
            "bytes": sum(len(b) for b in passes["load"]),
            "encode_s": encode_s,
        }
    )

    while (name := conn.recv()) is not None:
        encoded = passes.pop(name)
        stamps: dict[str, float] = {}

        def feed(encoded=encoded, stamps=stamps):
            stamps["first_send"] = time.monotonic()
            yield from encoded
            stamps["last_send"] = time.monotonic()

        try:
            summary = client.report(stream, feed())
        except grpc.RpcError as error:
            conn.send({"error": f"{error.code().name}: {error.details()}"})
            continue
        done = time.monotonic()
        conn.send({"gateway": gateway, **stamps, "done": done, "summary": _summary(summary)})
        del encoded
    stream.close()


def paced_reporter(port: int, tokens: dict[int, str | None], batches_path: str, conn) -> None:
    """Sends the prepared batches of ``batches_path`` (``.npz``: ``gateway`` per batch,
    ``offsets`` into ``device_id``, ``lat`` and ``lng``), batch k at ``start + k *
    interval_s`` on the monotonic clock (both from the parent). Each gateway's batches
    go on a stream of their own, with that gateway's reporter token, from a thread of
    their own; answers with the time each batch was handed to gRPC (just before it is
    yielded) and the summaries added up."""
    data = np.load(batches_path)
    offsets, gateways = data["offsets"], data["gateway"]
    encoded = [
        client.encode_batch(
            int(gateways[k]),
            data["device_id"][offsets[k] : offsets[k + 1]],
            data["lat"][offsets[k] : offsets[k + 1]],
            data["lng"][offsets[k] : offsets[k + 1]],
        )
        for k in range(gateways.size)
    ]
    streams = {int(g): channel(port, tokens.get(int(g))) for g in np.unique(gateways)}
    conn.send({"batches": len(encoded)})

    start_at, interval_s = conn.recv()
    sent = np.zeros(len(encoded))
    summaries: dict[int, object] = {}
    errors: list[str] = []

    def feed(gateway: int):
        for k in np.flatnonzero(gateways == gateway):
            wait = start_at + k * interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sent[k] = time.monotonic()
            yield encoded[k]

    def send(gateway: int) -> None:
        try:
            summaries[gateway] = client.report(streams[gateway], feed(gateway))
        except grpc.RpcError as error:
            errors.append(f"gateway {gateway}: {error.code().name}: {error.details()}")

    threads = [threading.Thread(target=send, args=(g,)) for g in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = time.monotonic()
    if errors:
        conn.send({"error": "; ".join(errors)})
        return
    total = {}
    for summary in summaries.values():
        for key, value in _summary(summary).items():
            total[key] = total.get(key, 0) + value
    conn.send({"sent": sent.tolist(), "done": done, "summary": total})
    for stream in streams.values():
        stream.close()


def gateway(port: int, token: str | None, gateway_id: int, window: int, out_dir: str, conn) -> None:
    """A push gateway with no rate limit: each RECIPIENTS message's arrival time (taken
    when the subscription hands it over, device ids parsed), alert id and ids are kept;
    the message is acked as soon as that is recorded. Commands: ``"dump"`` writes the
    record to ``gateway-<id>.npz`` and answers with its path; ``None`` ends."""
    lock = threading.Lock()
    times: list[float] = []
    alert_ids: list[str] = []
    parts: list[np.ndarray] = []
    others: list[tuple[float, int, str]] = []

    def handle(message: gateway_pb2.GatewayMessage, ids: np.ndarray) -> None:
        now = time.monotonic()
        with lock:
            if message.kind == gateway_pb2.MESSAGE_KIND_RECIPIENTS:
                times.append(now)
                alert_ids.append(message.alert_id)
                parts.append(ids)
            else:
                others.append((now, int(message.kind), message.alert_id))

    stream = channel(port, token)
    subscription = client.GatewaySubscription(
        stream, gateway_id, handle, max_devices_per_second=0.0, max_unacked_messages=window
    )
    conn.send({"gateway": gateway_id, "subscribed": time.monotonic()})

    while (command := conn.recv()) is not None:
        if command == "dump":
            with lock:
                names = sorted(set(alert_ids))
                code = {name: i for i, name in enumerate(names)}
                path = Path(out_dir) / f"gateway-{gateway_id}.npz"
                np.savez(
                    path,
                    time=np.array(times, dtype=np.float64),
                    alert=np.array([code[a] for a in alert_ids], dtype=np.int32),
                    count=np.array([p.size for p in parts], dtype=np.int64),
                    ids=np.concatenate(parts) if parts else np.empty(0, np.uint64),
                )
                error = subscription.error
            conn.send(
                {
                    "path": str(path),
                    "alerts": names,
                    "other_messages": len(others),
                    "error": None if error is None else f"{error.code().name}: {error.details()}",
                }
            )
    subscription.close()
    stream.close()
