"""The ``tuanyuan`` command line: ``alert`` against a real engine, ``serve`` flags, and
the errors operators see for bad flags and bad population files.

Alert commands run in this process (``cli.main``) against a
:class:`~engine.server.ServerThread` on a free port, with a dev issuer's token in a
file; ``serve --dev`` runs as a child process, as operators run it.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from grpc_support import START, payload, stages
from support import help_text, one_line_error
from support import run_cli as run

from engine import auth, cli, client, populations_io, server
from engine.api import alert_pb2
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread

SYDNEY = (-33.87, 151.21)


class Issuer:
    """An engine on a manual clock with dev credentials, and the flags with which the
    alert commands reach it as the issuer."""

    def __init__(self, tmp_path) -> None:
        credentials, tokens = auth.dev_credentials((1,))
        self.thread = ServerThread(ServerOptions(clock=ManualClock(START), credentials=credentials))
        port = self.thread.start()
        self.target = f"127.0.0.1:{port}"
        token_file = tmp_path / "issuer.token"
        token_file.write_text(tokens["dev-issuer"])
        self.flags = ["--server", self.target, "--token-file", str(token_file)]
        self.channel = client.connect(self.target, token=tokens["dev-issuer"])
        self.alerts = client.alert_stub(self.channel)

    def create(self, alert_id: str, **fields) -> alert_pb2.Alert:
        request = alert_pb2.CreateAlertRequest(
            alert_id=alert_id,
            centres=[alert_pb2.Centre(latitude=39.9, longitude=116.4)],
            stages=stages((1_000.0, 3_600)),
            payload=payload(**fields),
        )
        return self.alerts.CreateAlert(request)

    def get(self, alert_id: str) -> alert_pb2.Alert:
        return self.alerts.GetAlert(alert_pb2.GetAlertRequest(alert_id=alert_id))

    def close(self) -> None:
        self.channel.close()
        self.thread.stop()


@pytest.fixture
def issuer(tmp_path):
    engine = Issuer(tmp_path)
    yield engine
    engine.close()


def texts(alert: alert_pb2.Alert) -> dict[str, alert_pb2.LocalizedText]:
    return {text.language: text for text in alert.payload.texts}


# alert update keeps what the command line does not change


def test_update_with_payload_flags_changes_only_those_fields(issuer, capsys):
    photos = ["https://police.example/1.jpg", "https://police.example/2.jpg"]
    created = issuer.create("keep-1", height_cm=118, photo_urls=photos)
    assert created.payload.age_years == 6 and len(created.payload.texts) == 2

    status, out, err = run(
        capsys, "alert update --id keep-1 --name 李小明 --contact 120", *issuer.flags
    )
    assert status == 0, err
    assert "version 2" in out
    alert = issuer.get("keep-1")
    zh, en = texts(alert)["zh-Hans"], texts(alert)["en"]
    assert (zh.name, zh.contact, zh.description) == ("李小明", "120", "red coat")
    assert en == texts(created)["en"]
    assert [t.language for t in alert.payload.texts] == ["zh-Hans", "en"]
    assert alert.payload.age_years == 6 and alert.payload.sex == alert_pb2.SEX_MALE
    assert alert.payload.height_cm == 118 and list(alert.payload.photo_urls) == photos


def test_update_adds_a_language_and_replaces_the_given_fields(issuer, capsys):
    created = issuer.create("keep-2", photo_urls=["https://police.example/old.jpg"])
    status, _, err = run(
        capsys,
        "alert update --id keep-2 --language fr --name Li --description 'manteau rouge'",
        "--age 7 --photo https://police.example/new.jpg",
        *issuer.flags,
    )
    assert status == 0, err
    alert = issuer.get("keep-2")
    assert [t.language for t in alert.payload.texts] == ["zh-Hans", "en", "fr"]
    assert texts(alert)["fr"].description == "manteau rouge"
    assert texts(alert)["zh-Hans"] == texts(created)["zh-Hans"]
    assert alert.payload.age_years == 7
    assert list(alert.payload.photo_urls) == ["https://police.example/new.jpg"]


def test_update_of_a_new_language_without_a_name_is_refused(issuer, capsys):
    issuer.create("keep-3")
    status, _, err = run(
        capsys, "alert update --id keep-3 --language fr --contact 17", *issuer.flags
    )
    assert status == 2
    message = one_line_error(err)
    assert "--name" in message and "fr" in message
    assert issuer.get("keep-3").version == 1


def test_update_with_a_payload_file_replaces_the_payload_whole(issuer, capsys, tmp_path):
    issuer.create("keep-4", height_cm=118)
    whole = tmp_path / "payload.json"
    whole.write_text('{"texts": [{"language": "en", "name": "Li"}], "ageYears": 5}')
    status, _, err = run(capsys, "alert update --id keep-4 --payload", whole, *issuer.flags)
    assert status == 0, err
    alert = issuer.get("keep-4")
    assert [t.language for t in alert.payload.texts] == ["en"]
    assert alert.payload.age_years == 5 and alert.payload.height_cm == 0
    assert not alert.payload.photo_urls


def test_create_with_a_payload_file_and_text_flags_changes_the_file_s_text(
    issuer, capsys, tmp_path
):
    whole = tmp_path / "payload.json"
    whole.write_text(
        '{"texts": [{"language": "zh-Hans", "name": "李小明", "contact": "110"},'
        ' {"language": "en", "name": "Li Xiaoming"}], "ageYears": 6}'
    )
    status, _, err = run(
        capsys,
        "alert create --id file-1 --centre 39.9,116.4 --contact 120 --payload",
        whole,
        *issuer.flags,
    )
    assert status == 0, err
    alert = issuer.get("file-1")
    assert [(t.language, t.name, t.contact) for t in alert.payload.texts] == [
        ("zh-Hans", "李小明", "120"),
        ("en", "Li Xiaoming", ""),
    ]


def test_update_help_says_what_is_kept_and_what_is_replaced(capsys):
    out = help_text(capsys, "alert", "update")
    assert "replaces the whole payload" in out
    assert "kept" in out


# numbers out of range are refused with the flag's name


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--age -1", "--age must be 0 to 17"),
        ("--age 99999999999", "--age must be 0 to 17"),
        ("--age 18", "--age must be 0 to 17"),
        ("--height-cm -5", "--height-cm must be 0 to 250"),
        ("--height-cm 251", "--height-cm must be 0 to 250"),
    ],
)
def test_payload_numbers_out_of_range_are_refused(issuer, capsys, flags, expected):
    # Checked before any call: the update's alert does not even exist.
    status, out, err = run(
        capsys, "alert create --id range --centre 39.9,116.4 --name Li", flags, *issuer.flags
    )
    assert status == 2 and out == ""
    assert expected in one_line_error(err)
    status, _, err = run(capsys, "alert update --id range --name Li", flags, *issuer.flags)
    assert status == 2 and expected in one_line_error(err)


# serve flags


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--clock-speed 0", "--clock-speed must be above 0"),
        ("--clock-speed -1", "--clock-speed must be above 0"),
        ("--clock-speed nan", "--clock-speed must be above 0"),
        ("--purge-after -1", "--purge-after must be"),
        ("--purge-after nan", "--purge-after must be"),
    ],
)
def test_serve_refuses_bad_clock_speed_and_purge_after(capsys, tmp_path, flags, expected):
    tokens = tmp_path / "tokens.json"
    # An address that cannot be bound: an engine that accepted the flags would stop
    # there instead of serving until the test run is killed.
    status, _, err = run(capsys, "serve --dev --listen 256.0.0.1:1 --dev-tokens", tokens, flags)
    assert status == 2
    assert expected in one_line_error(err)
    assert not tokens.exists()


def test_serve_dev_prints_each_credential_with_its_token(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    log = tmp_path / "serve.log"
    flags = ["--dev", "--listen", "127.0.0.1:0", "--dev-tokens", str(tokens_file)]
    process, _ = server.spawn(flags, tmp_path / "port", log)
    try:
        tokens = auth.read_dev_tokens(tokens_file)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    output = log.read_text()
    assert "development credentials" in output.lower()
    assert "Traceback" not in output
    lines = output.splitlines()
    assert {"dev-issuer", "dev-operator", "dev-reporter-0", "dev-gateway-3"} <= tokens.keys()
    for name, token in tokens.items():
        assert any(name in line and token in line for line in lines), name


# negative coordinates as a flag's separate argument


def test_negative_latitudes_work_as_a_separate_argument(issuer, capsys):
    lat, lng = SYDNEY
    status, out, err = run(
        capsys, f"alert preview --centre {lat},{lng} --schedule local", *issuer.flags
    )
    assert status == 0, err
    assert "live devices" in out
    status, _, err = run(
        capsys,
        f"alert create --id sydney --centre {lat},{lng},'Circular Quay' --name Li",
        *issuer.flags,
    )
    assert status == 0, err
    alert = issuer.get("sydney")
    assert [(c.latitude, c.longitude, c.label) for c in alert.centres] == [
        (lat, lng, "Circular Quay")
    ]
    status, _, err = run(
        capsys,
        "alert update --id sydney --centre -33.8,151.2 --centre=-33.9,151.3",
        *issuer.flags,
    )
    assert status == 0, err
    alert = issuer.get("sydney")
    assert [(c.latitude, c.longitude) for c in alert.centres] == [(-33.8, 151.2), (-33.9, 151.3)]


def test_negative_center_of_tune(capsys, tmp_path):
    path = tmp_path / "few.parquet"
    populations_io.write(
        path,
        {
            "device_id": np.arange(3, dtype=np.uint64),
            "lat": np.array([-33.87, -33.871, -33.9]),
            "lng": np.array([151.21, 151.211, 151.3]),
            "gateway": np.zeros(3, dtype=np.uint16),
        },
    )
    status, out, err = run(capsys, "tune --population", path, "--center -33.87,151.21")
    assert status == 0, err
    assert "alert centre -33.87000,151.21000" in out


def test_only_a_negative_value_after_a_flag_is_attached_to_it():
    # A flag after a flag stays a flag; nothing after "--" changes.
    argv = ["alert", "create", "--id", "x", "--name", "--centre", "1,2"]
    assert cli.attach_negative_values(cli.build_parser(), argv) == argv
    argv = ["alert", "create", "--centre", "-1,2", "--", "--centre", "-3,4"]
    assert cli.attach_negative_values(cli.build_parser(), argv) == [
        "alert",
        "create",
        "--centre=-1,2",
        "--",
        "--centre",
        "-3,4",
    ]


# population files: a short row is named by its row


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device_id,lat,lng\n0,39.9,116.4\n1,39.9\n", "row 2: 2 values, the header has 3"),
        (
            "device_id,lat,lng\n0,39.9,116.4\n\n1,39.9,116.4\n2,39.9,116.4,7\n",
            "row 3: 4 values, the header has 3",
        ),
    ],
)
def test_a_csv_row_with_too_few_or_too_many_values_is_named(capsys, tmp_path, text, expected):
    path = tmp_path / "short.csv"
    path.write_text(text)
    status, _, err = run(capsys, "population info", path)
    assert status == 2
    message = one_line_error(err)
    assert message.startswith(f"tuanyuan: {path}: ")
    assert expected in message


def test_a_short_row_far_into_a_large_csv_is_named(tmp_path):
    path = tmp_path / "large.csv"
    rows = "".join(f"{i},39.9,116.4\n" for i in range(200_000))
    path.write_text(f"device_id,lat,lng\n{rows}200000,39.9\n200001,39.9,116.4\n")
    with pytest.raises(populations_io.PopulationError) as error:
        populations_io.read(path)
    assert str(error.value).startswith(f"{path}: row 200001: 2 values, the header has 3")
    assert "no value for lng" in str(error.value)


# a relative start counts from this machine's clock


def test_start_help_says_what_a_relative_start_counts_from(capsys):
    out = help_text(capsys, "alert", "create")
    assert "+SECONDS counts from this machine's clock" in out
    assert "--clock-speed" in out
