"""The hash-chained audit trail: sealing, verification against every kind of tampering,
the JSON-lines file, and ``tuanyuan audit verify`` on a file and on a real Redis stream."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import subprocess
import time

import pytest

from engine import audit, security_cli
from engine.api import alert_pb2
from engine.audit import GENESIS, AuditError, AuditFile, Chain, seal, verify


def fields(number: int, **changes) -> dict:
    request = alert_pb2.CreateAlertRequest(alert_id=f"alert-{number}")
    base = {
        "at": 1_800_000_000.0 + number,
        "actor": "police-hq",
        "role": "issuer",
        "peer": "ipv4:127.0.0.1:50312",
        "action": "CreateAlert",
        "alert_id": f"alert-{number}",
        "version": number,
        "request_sha256": audit.request_sha256(request),
        "outcome": "OK",
    }
    base.update(changes)
    return base


def trail(n: int) -> list[dict]:
    chain = Chain()
    return [chain.seal(fields(i)) for i in range(1, n + 1)]


# Sealing.


def test_seal_makes_strings_and_hashes_the_documented_encoding():
    entry = seal(fields(1, label="北京西站"), GENESIS, 1)
    assert all(isinstance(v, str) for v in entry.values())
    assert entry["seq"] == "1"
    assert entry["prev"] == GENESIS
    assert entry["at"] == "1800000001.000000"
    assert entry["version"] == "1"
    # The encoding, written out independently of engine.audit.canonical.
    rest = {k: v for k, v in entry.items() if k != "hash"}
    text = (
        "{"
        + ",".join(
            f"{json.dumps(k)}:{json.dumps(rest[k], ensure_ascii=False)}" for k in sorted(rest)
        )
        + "}"
    )
    assert entry["hash"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_seal_refuses_incomplete_or_ambiguous_fields():
    partial = fields(1)
    del partial["outcome"]
    with pytest.raises(ValueError, match="outcome"):
        seal(partial, GENESIS, 1)
    with pytest.raises(ValueError, match="set by seal"):
        seal(fields(1, seq=1), GENESIS, 1)
    with pytest.raises(TypeError, match="version"):
        seal(fields(1, version=True), GENESIS, 1)
    with pytest.raises(ValueError, match="seq"):
        seal(fields(1), GENESIS, 0)


def test_request_digest_is_of_the_deterministic_serialization():
    request = alert_pb2.CreateAlertRequest(alert_id="a", schedule_name="local")
    data = request.SerializeToString(deterministic=True)
    assert audit.request_sha256(request) == hashlib.sha256(data).hexdigest()
    assert audit.request_sha256(data) == hashlib.sha256(data).hexdigest()


# Verification.


def test_an_intact_trail_verifies():
    entries = trail(5)
    report = verify(entries)
    assert report.ok
    assert report.count == 5
    assert report.last_hash == entries[-1]["hash"]
    assert verify([]).ok


def test_an_edited_field_is_a_hash_mismatch():
    entries = trail(5)
    entries[2]["alert_id"] = "alert-forged"
    report = verify(entries)
    assert (report.ok, report.count, report.first_bad_seq) == (False, 2, 3)
    assert report.reason == audit.HASH_MISMATCH
    assert "entry seq 3" in report.message()


def test_an_edited_and_rehashed_entry_breaks_the_next_link():
    entries = trail(5)
    forged = dict(entries[2], outcome="PERMISSION_DENIED")
    forged["hash"] = hashlib.sha256(audit.canonical(forged)).hexdigest()
    entries[2] = forged
    report = verify(entries)
    assert (report.first_bad_seq, report.reason) == (4, audit.BROKEN_LINK)


@pytest.mark.parametrize(
    ("change", "bad_seq"),
    [
        (lambda e: e.pop(2), 4),  # delete an entry
        (lambda e: e.insert(2, e.pop(3)), 4),  # reorder two entries
        (lambda e: e.__delitem__(slice(1, 4)), 5),  # cut out the middle
        (lambda e: e.pop(0), 2),  # cut off the start
        (lambda e: e.insert(3, dict(e[3])), 4),  # repeat an entry
    ],
)
def test_a_removed_or_moved_entry_is_a_gap(change, bad_seq):
    entries = trail(6)
    change(entries)
    report = verify(entries)
    assert not report.ok
    assert (report.first_bad_seq, report.reason) == (bad_seq, audit.SEQ_GAP)


def test_renumbering_after_a_deletion_breaks_the_hash():
    entries = trail(5)
    del entries[2]
    for entry in entries[2:]:
        entry["seq"] = str(int(entry["seq"]) - 1)
    report = verify(entries)
    assert (report.first_bad_seq, report.reason) == (3, audit.HASH_MISMATCH)


def test_a_malformed_entry_is_named_by_the_seq_it_should_have():
    entries = trail(3)
    del entries[1]["peer"]
    report = verify(entries)
    assert (report.first_bad_seq, report.reason) == (2, audit.MALFORMED)
    assert "peer" in report.detail


def test_a_trail_can_be_checked_from_a_trusted_checkpoint():
    entries = trail(6)
    tail = entries[3:]
    assert not verify(tail).ok
    assert verify(tail, first_seq=4, prev_hash=entries[2]["hash"]).ok
    assert not verify(tail, first_seq=4, prev_hash=entries[1]["hash"]).ok


def test_extra_fields_are_covered_by_the_hash():
    chain = Chain()
    entries = [chain.seal(fields(1, detail="first")), chain.seal(fields(2))]
    assert verify(entries).ok
    entries[0]["detail"] = "second"
    assert verify(entries).reason == audit.HASH_MISMATCH


# The file.


def test_audit_file_appends_durably_and_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditFile(path) as sink:
        first = sink.append(fields(1))
        sink.append(fields(2))
    with AuditFile(path) as sink:
        third = sink.append(fields(3))
        entries = sink.read()
    assert first["seq"] == "1"
    assert third["seq"] == "3"
    assert third["prev"] == entries[1]["hash"]
    assert [e["alert_id"] for e in entries] == ["alert-1", "alert-2", "alert-3"]
    assert verify(entries).ok
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == entries


def test_audit_file_refuses_to_continue_a_damaged_tail(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditFile(path) as sink:
        sink.append(fields(1))
    with open(path, "ab") as file:
        file.write(b'{"seq":"2","act')  # a write cut short
    with pytest.raises(AuditError, match="incomplete"):
        AuditFile(path)

    entries = trail(2)
    entries[1]["outcome"] = "NOT_FOUND"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(AuditError, match="hash mismatch"):
        AuditFile(path)


# tuanyuan audit verify


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="tuanyuan")
    security_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_verify_a_file(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    with AuditFile(path) as sink:
        for i in range(1, 5):
            sink.append(fields(i))
    assert _run(["audit", "verify", "--file", str(path)]) == 0
    assert "4 entries intact" in capsys.readouterr().out

    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    assert _run(["audit", "verify", "--file", str(path)]) == 1
    err = capsys.readouterr().err
    assert "entry seq 3 (after 1 intact): gap in seq" in err

    path.write_text("not json\n")
    assert _run(["audit", "verify", "--file", str(path)]) == 1
    assert "line 1 is not a JSON object" in capsys.readouterr().err

    assert _run(["audit", "verify", "--file", str(tmp_path / "missing")]) == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of our own on a free loopback port, without persistence."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    import redis

    port = _free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_verify_a_redis_stream_read_in_pages(redis_url, capsys, monkeypatch):
    import redis

    connection = redis.Redis.from_url(redis_url)
    key = "tuanyuan:audit"
    connection.delete(key)
    chain = Chain.after(audit.last_redis_entry(connection, key))
    for i in range(1, 8):
        connection.xadd(key, chain.seal(fields(i)))
    # Continue the chain as a restarted engine would.
    chain = Chain.after(audit.last_redis_entry(connection, key))
    assert chain.seq == 7
    connection.xadd(key, chain.seal(fields(8)))

    entries = list(audit.read_redis(connection, key, page=3))
    assert [e["seq"] for e in entries] == [str(i) for i in range(1, 9)]
    assert _run(["audit", "verify", "--redis", redis_url]) == 0
    assert "8 entries intact" in capsys.readouterr().out

    def rewrite(stream_entries):
        connection.delete(key)
        for entry in stream_entries:
            connection.xadd(key, entry)

    # Tamper: change entry 5's actor (a stream cannot be edited in place, so rewrite it).
    rewrite([*entries[:4], dict(entries[4], actor="someone-else"), *entries[5:]])
    assert _run(["audit", "verify", "--redis", redis_url, "--key", key]) == 1
    assert "entry seq 5 (after 4 intact): hash mismatch" in capsys.readouterr().err

    rewrite([*entries[:4], *entries[5:]])
    assert _run(["audit", "verify", "--redis", redis_url]) == 1
    assert "entry seq 6 (after 4 intact): gap in seq" in capsys.readouterr().err

    # The journal's head record catches entries cut off the end.
    rewrite(entries)
    connection.set(key + ":head", f"8 {entries[7]['hash']}")
    assert _run(["audit", "verify", "--redis", redis_url]) == 0
    capsys.readouterr()
    rewrite(entries[:6])
    assert _run(["audit", "verify", "--redis", redis_url]) == 1
    assert "records seq 8, but the stream ends at seq 6" in capsys.readouterr().err
    rewrite(entries[:7])  # a head record read before an entry was appended is fine
    connection.set(key + ":head", f"6 {entries[5]['hash']}")
    assert _run(["audit", "verify", "--redis", redis_url]) == 0
    capsys.readouterr()

    assert _run(["audit", "verify", "--redis", redis_url, "--key", "nothing"]) == 2
    assert "no such stream" in capsys.readouterr().err
    # An engine on another prefix keeps its trail under that prefix.
    connection.copy(key, "other:audit")
    assert _run(["audit", "verify", "--redis", redis_url, "--redis-prefix", "other:"]) == 0
    assert "stream other:audit" in capsys.readouterr().out
    assert _run(["audit", "verify", "--redis", redis_url, "--redis-prefix", "none:"]) == 2
    assert "none:audit" in capsys.readouterr().err
    connection.close()


def test_verify_reports_an_unreachable_redis(capsys):
    assert _run(["audit", "verify", "--redis", f"redis://127.0.0.1:{_free_port()}/0"]) == 2
    assert capsys.readouterr().err.startswith("tuanyuan: redis://127.0.0.1:")


def test_audit_file_takes_entries_sealed_elsewhere_only_if_they_continue_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    entries = trail(3)
    with AuditFile(path) as sink:
        sink.write_sealed(entries[0])
        with pytest.raises(AuditError, match="gap in seq"):
            sink.write_sealed(entries[2])
        forged = dict(entries[1], outcome="OK, trust me")
        with pytest.raises(AuditError, match="hash mismatch"):
            sink.write_sealed(forged)
        sink.write_sealed(entries[1])
        assert sink.chain.seq == 2
        assert sink.append(fields(3))["prev"] == entries[1]["hash"]
    assert verify(audit.read_file(path)).count == 3
