"""The whole story over gRPC on loopback, three hours in about half a minute.

1. An engine starts (``tuanyuan serve --dev`` in a child process, its clock running 360
   times faster than real time).
2. Three partner apps report a synthetic metro population of a million devices through
   ReportLocations, and keep reporting as people move.
3. Three push gateways subscribe; the third declares a push rate it can sustain.
4. The alert service publishes an alert with the ``local`` schedule (1, 2, 3 km, an hour
   each) where the child was last seen, and watches it.
5. Ninety minutes in, a sighting moves the centre; at 2 h 45 min the child is found and
   the alert is resolved with a follow-up notice to everyone it reached.

The run ends with a summary table and pictures in the output folder: the rings and the
recipients on a map, and the reach over time. It also checks what the gateways got: no
device twice, nothing the engine counted missing, every recipient reported inside a ring.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from engine import auth, client, population, server
from engine.api import alert_pb2, gateway_pb2
from engine.index import EARTH_RADIUS_M

SPEED = 360.0  # simulated seconds per real second
HOUR = 3600.0
GATEWAY_NAMES = {1: "maps app", 2: "social app", 3: "payments app"}
PACED_GATEWAY, PACED_RATE = 3, 5_000.0  # devices a second
SIGHTING_AT, RESOLVE_AT = 1.5 * HOUR, 2.75 * HOUR
MOVE_EVERY = 10 * 60.0  # simulated seconds between movement rounds
BATCH = 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devices", type=int, default=1_000_000, help="devices in the population (1000000)"
    )
    parser.add_argument("--city", default="Beijing", help="city the metro surrounds (Beijing)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (7)")
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="folder for the pictures"
    )


class Gateway:
    """A push gateway: keeps what it receives, acks each message once handled."""

    def __init__(self, channel, gateway: int, rate: float) -> None:
        self.gateway = gateway
        self.lock = threading.Lock()
        self.recipients: dict[int, list[np.ndarray]] = defaultdict(list)  # stage -> ids
        self.timeline: list[tuple[float, int]] = []  # (real time, devices)
        self.follow_up: list[np.ndarray] = []
        self.payloads = 0
        self.closed = False
        self.subscription = client.GatewaySubscription(
            channel, gateway, self.handle, max_devices_per_second=rate
        )

    def handle(self, message: gateway_pb2.GatewayMessage, ids: np.ndarray) -> None:
        with self.lock:
            if message.kind == gateway_pb2.MESSAGE_KIND_ALERT:
                self.payloads += 1
            elif message.kind == gateway_pb2.MESSAGE_KIND_RECIPIENTS:
                self.recipients[message.stage_number].append(ids)
                self.timeline.append((time.monotonic(), ids.size))
            elif message.kind == gateway_pb2.MESSAGE_KIND_CLOSED:
                self.closed = True
            elif message.kind == gateway_pb2.MESSAGE_KIND_FOLLOW_UP:
                self.follow_up.append(ids)

    def all_ids(self) -> np.ndarray:
        with self.lock:
            parts = [ids for stage in self.recipients.values() for ids in stage]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _start_engine(folder: Path) -> tuple[subprocess.Popen, int, Path]:
    log = folder / "engine.log"
    flags = [
        "--dev",
        "--dev-tokens",
        str(folder / "tokens.json"),
        "--listen",
        "127.0.0.1:0",
        "--clock-speed",
        str(SPEED),
        "--ttl",
        str(int(6 * HOUR)),
    ]
    try:
        process, port = server.spawn(flags, folder / "port", log)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    return process, port, log


class Channels:
    """One channel per credential, as each party would hold its own token."""

    def __init__(self, port: int, tokens: dict[str, str]) -> None:
        target = f"127.0.0.1:{port}"
        self.issuer = client.connect(target, token=tokens["dev-issuer"])
        self.reporters = {
            g: client.connect(target, token=tokens[f"dev-reporter-{g}"])
            for g in population.GATEWAYS
        }
        self.gateways = {
            g: client.connect(target, token=tokens[f"dev-gateway-{g}"]) for g in population.GATEWAYS
        }


def _report_all(channels, people: dict, lat: np.ndarray, lng: np.ndarray) -> tuple[int, float]:
    """Each partner app streams its devices' positions on its own thread."""
    summaries = []

    def app(gateway: int) -> None:
        rows = np.flatnonzero(people["gateway"] == gateway)
        batches = (
            client.encode_batch(gateway, people["device_id"][part], lat[part], lng[part])
            for part in np.array_split(rows, max(1, math.ceil(rows.size / BATCH)))
        )
        summaries.append(client.report(channels.reporters[gateway], batches))

    started = time.perf_counter()
    threads = [threading.Thread(target=app, args=(g,)) for g in population.GATEWAYS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return sum(s.geofence_recipients for s in summaries), seconds


def _offset(lat: float, lng: float, north_m: float, east_m: float) -> tuple[float, float]:
    return (
        lat + math.degrees(north_m / EARTH_RADIUS_M),
        lng + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat)))),
    )


def _line(alert: alert_pb2.Alert, sim_s: float) -> str:
    if not alert.current_stage:
        state = alert_pb2.AlertStatus.Name(alert.status).removeprefix("ALERT_STATUS_").lower()
        return f"[{_clock(sim_s)}] {state}: {alert.notified_devices:,} notified"
    stage = alert.stages[alert.current_stage - 1]
    parts = []
    for g in population.GATEWAYS:
        recipients = sum(
            t.recipients for s in alert.stages for t in s.gateways if t.gateway_id == g
        )
        acked = sum(t.acked for s in alert.stages for t in s.gateways if t.gateway_id == g)
        parts.append(f"gw{g} {acked:,}/{recipients:,}")
    return (
        f"[{_clock(sim_s)}] stage {alert.current_stage} ({stage.radius_m / 1000:g} km): "
        f"{alert.notified_devices:,} notified, {sum(s.walked_in for s in alert.stages):,} walked "
        f"in; acked/queued {' | '.join(parts)}"
    )


def _clock(sim_s: float) -> str:
    sim_s = max(0.0, sim_s)
    return f"{int(sim_s // 3600)}:{int(sim_s % 3600 // 60):02d}"


def run(args: argparse.Namespace) -> int:
    if args.devices < 1000:
        print("tuanyuan: --devices must be at least 1000", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        process, port, log = _start_engine(Path(scratch))
        try:
            tokens = auth.read_dev_tokens(Path(scratch) / "tokens.json")
            return _story(args, Channels(port, tokens), port, out, started)
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            (out / "engine.log").write_text(log.read_text())


def _story(args: argparse.Namespace, channels, port: int, out: Path, started: float) -> int:
    alerts = client.alert_stub(channels.issuer)
    print(f"engine up on 127.0.0.1:{port}, its clock running {SPEED:g}x (1 s real = 6 min)")

    # The population, reported by three partner apps.
    people = population.metro(args.devices, seed=args.seed, city=args.city)
    lat, lng = people["lat"], people["lng"]
    _, seconds = _report_all(channels, people, lat, lng)
    print(
        f"3 partner apps reported {args.devices:,} devices around {args.city} over gRPC in "
        f"{seconds:.2f} s ({args.devices / seconds / 1e6:.2f} M reports/s)"
    )

    gateways = {
        g: Gateway(channels.gateways[g], g, PACED_RATE if g == PACED_GATEWAY else 0.0)
        for g in population.GATEWAYS
    }
    print(
        f"3 gateways subscribed; gateway {PACED_GATEWAY} pushes at most {PACED_RATE:,.0f} devices/s"
    )

    # The alert, where people are: a little off the city centre.
    pick = np.random.default_rng(args.seed + 1).integers(lat.size)
    centre = (float(lat[pick]), float(lng[pick]))
    sighting = _offset(*centre, north_m=2_500, east_m=3_500)
    request = alert_pb2.CreateAlertRequest(
        alert_id=f"demo-{int(time.time())}",
        centres=[alert_pb2.Centre(latitude=centre[0], longitude=centre[1], label="last seen")],
        schedule_name="local",
        payload=alert_pb2.AlertPayload(
            texts=[
                alert_pb2.LocalizedText(
                    language="zh-Hans",
                    name="小明",
                    description="穿红色外套, 蓝色书包",
                    last_seen_place="学校门口",
                    contact="110",
                ),
                alert_pb2.LocalizedText(
                    language="en",
                    name="Xiao Ming",
                    description="red coat, blue school bag",
                    last_seen_place="outside the school gate",
                    contact="110",
                ),
            ],
            age_years=6,
            sex=alert_pb2.SEX_MALE,
            height_cm=115,
        ),
    )
    created = alerts.CreateAlert(request)
    alert_id = created.alert_id
    t0 = time.monotonic()
    start_sim = created.start_time.ToNanoseconds() / 1e9
    print(f"\nalert {alert_id} published at ({centre[0]:.5f}, {centre[1]:.5f}), schedule local")

    # Watch it: a line a second, and one at each stage start.
    events: list[tuple[float, alert_pb2.AlertEvent]] = []
    watch = alerts.WatchAlert(alert_pb2.WatchAlertRequest(alert_id=alert_id))

    def follow() -> None:
        printed = 0.0
        for event in watch:
            events.append((time.monotonic(), event))
            sim = event.time.ToNanoseconds() / 1e9 - start_sim
            started_stage = event.kind == alert_pb2.ALERT_EVENT_KIND_STAGE_STARTED
            if started_stage or event.kind >= alert_pb2.ALERT_EVENT_KIND_UPDATED:
                kind = alert_pb2.AlertEventKind.Name(event.kind).removeprefix("ALERT_EVENT_KIND_")
                print(f"[{_clock(sim)}] {kind.lower().replace('_', ' ')}", flush=True)
            if time.monotonic() - printed >= 1.0 or started_stage:
                printed = time.monotonic()
                print(_line(event.alert, sim), flush=True)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()

    # People move; their apps report every ten simulated minutes, on their own thread so
    # that the sighting and the resolve come on time.
    positions = [(lat, lng)]
    movement = {"walked": 0, "moved": 0}
    done = threading.Event()

    def move_people() -> None:
        step = 0
        while not done.is_set():
            if (time.monotonic() - t0) * SPEED < (step + 1) * MOVE_EVERY:
                time.sleep(0.02)
                continue
            step += 1
            moved_lat, moved_lng = population.move(
                *positions[-1], seed=args.seed + step, step_m=150.0
            )
            positions.append((moved_lat, moved_lng))
            found, _ = _report_all(channels, people, moved_lat, moved_lng)
            movement["walked"] += found
            movement["moved"] += moved_lat.size

    mover = threading.Thread(target=move_people, daemon=True)
    mover.start()

    def wait_until(sim_s: float) -> float:
        while (now := (time.monotonic() - t0) * SPEED) < sim_s:
            time.sleep(0.01)
        return now

    sighted_at = wait_until(SIGHTING_AT)
    alerts.UpdateAlert(
        alert_pb2.UpdateAlertRequest(
            alert_id=alert_id,
            centres=alert_pb2.Centres(
                centres=[
                    alert_pb2.Centre(
                        latitude=sighting[0], longitude=sighting[1], label="subway sighting"
                    )
                ]
            ),
        )
    )
    print(f"[{_clock(sighted_at)}] sighting: the centre moves 4.3 km north-east")
    resolved_at = wait_until(RESOLVE_AT)
    done.set()
    alerts.ResolveAlert(
        alert_pb2.ResolveAlertRequest(
            alert_id=alert_id,
            resolution=alert_pb2.RESOLUTION_FOUND,
            follow_up=[
                alert_pb2.LocalizedNotice(language="zh-Hans", text="小明已找到, 谢谢大家的帮助"),
                alert_pb2.LocalizedNotice(language="en", text="Xiao Ming is found. Thank you."),
            ],
        )
    )
    print(f"[{_clock(resolved_at)}] resolved: found")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        final = alerts.GetAlert(alert_pb2.GetAlertRequest(alert_id=alert_id))
        got = sum(sum(ids.size for ids in g.follow_up) for g in gateways.values())
        if got >= final.follow_up_devices and all(g.closed for g in gateways.values()):
            break
        time.sleep(0.1)
    watcher.join(5)
    mover.join(30)
    for gateway in gateways.values():
        gateway.subscription.close()

    ok = _summary(final, gateways, movement["moved"], movement["walked"])
    moments = {"sighting": sighted_at / HOUR, "found": resolved_at / HOUR}
    _pictures(out, people, positions, centre, sighting, final, gateways, events, t0, moments)
    print(f"\npictures and the engine's log are in {out.resolve()}/")
    print(f"total run {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def _summary(final, gateways: dict, moved: int, walked: int) -> bool:
    print(f"\n{moved:,} movement reports sent during the alert; {walked:,} devices walked in")
    header = f"{'stage':>6} {'radius':>7} {'recipients':>11} {'walked in':>10}"
    for g in population.GATEWAYS:
        header += f" {'gw' + str(g) + ' acked':>12}"
    print(header)
    for stage in final.stages:
        row = f"{stage.stage_number:>6} {stage.radius_m / 1000:>5g}km {stage.recipients:>11,}"
        row += f" {stage.walked_in:>10,}"
        for g in population.GATEWAYS:
            acked = sum(t.acked for t in stage.gateways if t.gateway_id == g)
            row += f" {acked:>12,}"
        print(row)
    withdrawn = sum(t.withdrawn for s in final.stages for t in s.gateways)
    print(
        f"notified {final.notified_devices:,} devices; withdrawn at resolve (not yet handed "
        f"over): {withdrawn:,}; follow-up notice to {final.follow_up_devices:,}"
    )

    ok = True
    for g, gateway in gateways.items():
        ids = gateway.all_ids()
        unique = np.unique(ids)
        expected = sum(t.acked for s in final.stages for t in s.gateways if t.gateway_id == g)
        follow = np.concatenate(gateway.follow_up) if gateway.follow_up else np.empty(0, np.uint64)
        line = (
            f"gateway {g} ({GATEWAY_NAMES[g]}): {ids.size:,} received, {ids.size - unique.size} "
            f"twice, {expected:,} acked by the engine's count, follow-up to {follow.size:,}"
        )
        print(line)
        if ids.size != unique.size or unique.size != expected:
            print("  ERROR: duplicates, or the gateway and the engine disagree")
            ok = False
        if not np.array_equal(np.unique(follow), unique):
            print("  ERROR: the follow-up does not go to exactly the devices reached")
            ok = False
    print(
        "checked: no device notified twice; follow-up to exactly the devices reached" if ok else ""
    )
    return ok


def _pictures(out, people, positions, centre, sighting, final, gateways, events, t0, moments):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat0, lng0 = centre
    km_lat = math.radians(1.0) * EARTH_RADIUS_M / 1000
    km_lng = km_lat * math.cos(math.radians(lat0))

    def xy(lat, lng):
        return (np.asarray(lng) - lng0) * km_lng, (np.asarray(lat) - lat0) * km_lat

    # Rings and recipients on a map-like plot, at the last reported positions.
    lat, lng = positions[-1]
    x, y = xy(lat, lng)
    near = (np.abs(x) < 9) & (np.abs(y) < 9)
    rows = {}
    order = np.argsort(people["device_id"])
    for gateway in gateways.values():
        for stage, parts in gateway.recipients.items():
            ids = np.concatenate(parts)
            found = order[np.searchsorted(people["device_id"], ids, sorter=order)]
            rows.setdefault(stage, []).append(found)
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.hexbin(x[near], y[near], gridsize=120, bins="log", cmap="Greys", mincnt=1, linewidths=0)
    colours = ["#d62728", "#ff7f0e", "#1f77b4"]
    for stage in sorted(rows):
        found = np.concatenate(rows[stage])
        sx, sy = xy(lat[found], lng[found])
        ax.scatter(sx, sy, s=0.3, color=colours[(stage - 1) % 3], label=f"stage {stage}")
    for (clat, clng), style in ((centre, "-"), (sighting, "--")):
        cx, cy = xy(clat, clng)
        for stage in final.stages:
            ax.add_patch(plt.Circle((cx, cy), stage.radius_m / 1000, fill=False, ls=style, lw=0.8))
        ax.plot(cx, cy, "k+", ms=12)
    ax.annotate("", xy=xy(*sighting), xytext=xy(*centre), arrowprops={"arrowstyle": "->"})
    ax.set_xlim(-9, 9)
    ax.set_ylim(-9, 9)
    ax.set_aspect("equal")
    ax.set_xlabel("km east of the first centre")
    ax.set_ylabel("km north")
    ax.set_title("Recipients by stage; rings around the first centre and the sighting (dashed)")
    ax.legend(markerscale=20, loc="upper left")
    fig.savefig(out / "rings.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    # Reach over time: devices handed to each gateway, in simulated hours.
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for g, gateway in gateways.items():
        with gateway.lock:
            timeline = list(gateway.timeline)
        if not timeline:
            continue
        t = np.array([(when - t0) * SPEED / HOUR for when, _ in timeline])
        reach = np.cumsum([count for _, count in timeline])
        ax.step(t, reach, where="post", label=f"gateway {g} ({GATEWAY_NAMES[g]})")
    for when, event in events:
        if event.kind == alert_pb2.ALERT_EVENT_KIND_STAGE_STARTED:
            ax.axvline((when - t0) * SPEED / HOUR, color="grey", lw=0.6, ls=":")
    ax.axvline(moments["sighting"], color="black", lw=0.8, ls="--", label="sighting")
    ax.axvline(moments["found"], color="green", lw=0.8, label="found")
    ax.set_xlabel("hours since the alert")
    ax.set_ylabel("devices notified")
    ax.set_title("Reach over time (dotted: stage starts)")
    ax.legend()
    fig.savefig(out / "reach.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
