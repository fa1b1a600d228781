"""``tuanyuan serve --schedules DIR``: operator schedules are added under names of their
own; a clash with a shipped schedule or between two files, or a folder that is not there,
stops the engine at start with one line naming the file."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_support import BEIJING, create_request

from engine import auth, cli, client, schedules
from engine.clock import ManualClock
from engine.schedules import ScheduleError
from engine.server import ServerOptions, ServerThread

NIGHT = 'name = "night"\n[[stage]]\nradius_km = 2\nduration_min = 90\n'


def schedule_file(name: str | None, radius_km: float = 5) -> str:
    named = f'name = "{name}"\n' if name is not None else ""
    return named + f"[[stage]]\nradius_km = {radius_km}\nduration_h = 2\n"


def serve(capsys, tmp_path, folder) -> tuple[int, str]:
    """``tuanyuan serve --schedules folder`` in this process; returns the exit status and
    stderr. Every case here stops before the engine binds a port."""
    credential, _ = auth.new_credential("hq", "issuer")
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(auth.to_toml(credential))
    status = cli.main(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--credentials",
            str(credentials),
            "--schedules",
            str(folder),
        ]
    )
    return status, capsys.readouterr().err


@pytest.mark.parametrize("shipped", sorted(schedules.SHIPPED))
def test_a_file_naming_a_shipped_schedule_is_refused(tmp_path, shipped):
    path = tmp_path / "mine.toml"
    path.write_text(schedule_file(shipped))
    with pytest.raises(ScheduleError) as raised:
        schedules.load_folder(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}: names its schedule '{shipped}'")
    assert "shipped with the engine" in message and "cannot be redefined" in message


def test_a_nameless_file_named_after_a_shipped_schedule_is_refused(tmp_path):
    path = tmp_path / "local.toml"
    path.write_text(schedule_file(None))
    with pytest.raises(ScheduleError, match="named 'local' after the file") as raised:
        schedules.load_folder(tmp_path)
    assert str(raised.value).startswith(f"{path}: has no name")


def test_two_files_with_one_name_are_refused_naming_both(tmp_path):
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(schedule_file("night", 2))
    second.write_text(schedule_file("night", 3))
    with pytest.raises(ScheduleError) as raised:
        schedules.load_folder(tmp_path)
    assert str(raised.value) == (
        f"{second}: names its schedule 'night', as {first} does already; "
        "every schedule needs its own name"
    )


def test_a_name_and_a_file_name_that_clash_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text(schedule_file("night"))
    (tmp_path / "night.toml").write_text(schedule_file(None))
    with pytest.raises(ScheduleError, match=r"night\.toml: has no name.*as .*a\.toml does already"):
        schedules.load_folder(tmp_path)


def test_a_missing_folder_is_refused(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ScheduleError) as raised:
        schedules.load_folder(missing)
    assert str(raised.value) == f"schedules folder {missing}: does not exist"


def test_a_file_instead_of_a_folder_is_refused(tmp_path):
    path = tmp_path / "night.toml"
    path.write_text(NIGHT)
    with pytest.raises(ScheduleError, match=f"schedules folder {path}: is a file"):
        schedules.load_folder(path)


def test_a_folder_without_schedules_loads_nothing_and_warns(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("not a schedule")
    with caplog.at_level(logging.WARNING, logger="engine.schedules"):
        assert schedules.load_folder(tmp_path) == {}
    assert f"schedules folder {tmp_path} has no *.toml files" in caplog.text


def test_the_schedules_loaded_are_logged_with_their_files(tmp_path, caplog):
    (tmp_path / "night.toml").write_text(NIGHT)
    (tmp_path / "wide.toml").write_text(schedule_file(None, 20))
    with caplog.at_level(logging.INFO, logger="engine.schedules"):
        found = schedules.load_folder(tmp_path)
    assert sorted(found) == ["night", "wide"]
    assert found["night"][0] == tmp_path / "night.toml"
    assert found["wide"][1].stages[0].radius_m == 20_000
    assert f"operator schedule night from {tmp_path / 'night.toml'}: 2 km for 90 min" in (
        caplog.text
    )
    assert f"operator schedule wide from {tmp_path / 'wide.toml'}: 20 km for 2 h" in caplog.text


def _with_file(name: str, text: str):
    def make(folder):
        folder.mkdir()
        (folder / name).write_text(text)

    return make


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_with_file("mine.toml", schedule_file("local")), "cannot be redefined"),
        (_with_file("bad.toml", "[[stage]]\n"), "give exactly one radius"),
        (lambda folder: None, "does not exist"),
        (lambda folder: folder.write_text(NIGHT), "is a file"),
    ],
    ids=["shipped-name", "broken-file", "missing", "not-a-folder"],
)
def test_serve_stops_at_start_with_one_line(capsys, tmp_path, make, expected):
    folder = tmp_path / "schedules"
    make(folder)
    status, err = serve(capsys, tmp_path, folder)
    assert status == 2
    assert err.startswith(f"tuanyuan: {folder}") or err.startswith(
        f"tuanyuan: schedules folder {folder}"
    )
    assert expected in err
    assert len(err.strip().splitlines()) == 1


def test_an_operator_schedule_is_served_next_to_the_shipped_ones(tmp_path):
    (tmp_path / "night.toml").write_text(NIGHT)
    (tmp_path / "dusk.toml").write_text(schedule_file(None))
    credentials, tokens = auth.dev_credentials(gateways=())
    options = ServerOptions(
        clock=ManualClock(1_800_000_000.0), credentials=credentials, schedules_dir=tmp_path
    )
    with ServerThread(options) as server:
        assert sorted(server.engine.schedules) == ["dusk", "local", "night", "regional"]
        assert server.engine.schedules["local"] is schedules.SHIPPED["local"]
        alerts = client.alert_stub(
            client.connect(f"127.0.0.1:{server.port}", token=tokens["dev-issuer"])
        )
        alert = alerts.CreateAlert(create_request("n1", [BEIJING], "night"), timeout=10)
        assert alert.schedule_name == "night"
        assert [(s.radius_m, s.duration_s) for s in alert.stages] == [(2000.0, 5400)]
        # A file without a name: its alerts report the file's name.
        alert = alerts.CreateAlert(create_request("n3", [BEIJING], "dusk"), timeout=10)
        assert alert.schedule_name == "dusk"
        with pytest.raises(grpc.RpcError) as raised:
            alerts.CreateAlert(create_request("n2", [BEIJING], "nope"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
