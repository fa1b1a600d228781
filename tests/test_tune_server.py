"""`tuanyuan tune --server`: the same counts from a running engine's PreviewAlert as from
the population file, and the oracle's."""

from __future__ import annotations

import json

import numpy as np
from grpc_support import Population
from oracle import haversine_m

from engine import auth, cli, client
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread


def test_tune_against_a_running_engine_matches_the_oracle(tmp_path, capsys):
    people = Population(20_000, seed=5)
    credentials, tokens = auth.dev_credentials((1, 2, 3))
    options = ServerOptions(clock=ManualClock(1_800_000_000.0), credentials=credentials)
    with ServerThread(options) as server:
        target = f"127.0.0.1:{server.port}"
        for gateway in (1, 2, 3):
            rows = np.flatnonzero(people.gateway == gateway)
            channel = client.connect(target, token=tokens[f"dev-reporter-{gateway}"])
            client.report(channel, people.batches(rows))
        token_file = tmp_path / "operator"
        token_file.write_text(tokens["dev-operator"])
        centre = (float(people.lat[7]), float(people.lng[7]))
        out = tmp_path / "tune.json"
        status = cli.main(
            [
                "tune",
                "--server",
                target,
                f"--center={centre[0]},{centre[1]}",
                "--schedule",
                "local",
                "--token-file",
                str(token_file),
                "--json",
                str(out),
            ]
        )
    assert status == 0, capsys.readouterr().err
    stages = json.loads(out.read_text())["stages"]
    distance = haversine_m(centre[0], centre[1], people.lat, people.lng)
    previous = 0
    for stage in stages:
        inside = distance <= stage["radius_m"]
        slack = np.abs(distance - stage["radius_m"]) <= 1.0
        assert abs(stage["cumulative_recipients"] - int(inside.sum())) <= int(slack.sum())
        assert stage["new_recipients"] == stage["cumulative_recipients"] - previous
        previous = stage["cumulative_recipients"]
    assert "live devices" in capsys.readouterr().out


def test_tune_server_refuses_the_file_only_options(capsys):
    status = cli.main(["tune", "--server", "127.0.0.1:1", "--center=1,2", "--movement"])
    assert status == 2
    assert "--movement" in capsys.readouterr().err
