"""The auth matrix over a real engine: every rpc, every caller, one table.

The table (``bench.auth_matrix.RPCS`` and ``CALLERS``) is shared with ``python -m
bench.auth_matrix``, which writes the same matrix to ``bench/results``. Each cell is
one call: no token or an unknown token is UNAUTHENTICATED, a role the rpc does not
admit is PERMISSION_DENIED, an admitted call ends however its request makes it end;
health and reflection are open. A refused call changes nothing (alerts, live devices,
gateway queues). Streams are refused the same way as unary calls.
"""

from __future__ import annotations

import grpc
import pytest

from bench.auth_matrix import (
    ADMITTED,
    CALLERS,
    CROSS_GATEWAY,
    PERMISSION_DENIED,
    RPCS,
    UNAUTHENTICATED,
    World,
    expected,
    run_cell,
)
from engine import auth
from engine.api import alert_pb2, gateway_pb2, location_pb2

CELLS = [(rpc, caller) for rpc in RPCS for caller in CALLERS]


@pytest.fixture(scope="module")
def world():
    with World() as world:
        yield world


def test_the_table_covers_every_rpc_of_the_contract():
    contract = {
        f"/{service.full_name}/{method.name}"
        for module in (alert_pb2, location_pb2, gateway_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    tuanyuan = {rpc.method for rpc in RPCS if rpc.roles is not None}
    assert tuanyuan == contract
    assert len(contract) == 10


def test_the_table_agrees_with_the_interceptor():
    # The table is written out by hand; the engine's own table must say the same.
    for rpc in RPCS:
        if rpc.roles is None:
            service = rpc.method.lstrip("/").partition("/")[0]
            assert service in auth.OPEN_SERVICES
            assert rpc.method not in auth.METHOD_ROLES
        else:
            assert auth.METHOD_ROLES[rpc.method] == rpc.roles, rpc.name
    assert set(auth.METHOD_ROLES) == {rpc.method for rpc in RPCS if rpc.roles is not None}


def test_every_caller_kind_is_refused_somewhere_and_admitted_somewhere():
    # A matrix where a column is all one answer would test nothing about roles.
    for caller in CALLERS:
        answers = {expected(rpc, caller) for rpc in RPCS}
        assert ADMITTED in answers, caller
        assert answers & {UNAUTHENTICATED, PERMISSION_DENIED}, caller


@pytest.mark.parametrize(
    ("rpc", "caller"),
    CELLS,
    ids=[f"{rpc.name}-{caller.replace(' ', '-')}" for rpc, caller in CELLS],
)
def test_cell(world, rpc, caller):
    cell = run_cell(world, rpc, caller)
    if cell.expected == ADMITTED:
        assert cell.code not in (UNAUTHENTICATED, PERMISSION_DENIED), cell
        # The requests are chosen so that an admitted call succeeds or is NOT_FOUND.
        assert cell.code in (grpc.StatusCode.OK.name, grpc.StatusCode.NOT_FOUND.name), cell
    else:
        assert cell.code == cell.expected, cell
        assert cell.unchanged, f"the refused call changed the engine's state: {cell}"


@pytest.mark.parametrize("case", CROSS_GATEWAY, ids=[case.name for case in CROSS_GATEWAY])
def test_cross_gateway(world, case):
    result = case.run(world)
    assert result.code == PERMISSION_DENIED, result
    assert "gateway 1" in result.details and "gateway 2" in result.details, result.details
    failed = [name for name, ok in result.checks.items() if not ok]
    assert not failed, result
