"""Access control: TLS, bearer tokens and client certificates, and one test per rule.

The rules (server/auth.py, docs/deployment.md): a facility settles, pre-settles and reverses
only as itself and reads only its own settlements; members, accumulators, facilities and
policies are readable by any authenticated caller; registry writes need the admin credential;
no credential is UNAUTHENTICATED, a forbidden call PERMISSION_DENIED; health and reflection
are open. Certificates are made at test time by a throwaway CA (tests/pki.py).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.loader import store
from pki import CA
from reimburse.v1 import policy_pb2 as pol
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import auth
from server.app import create_server
from server.auth import AuthConfig, Security, TokenStore
from server.client import Client
from server.ledger.memory import MemoryLedger
from server.tls import ClientSecurity, ServerTLS
from service_fixtures import ROOT, ServerProcess, d, inpatient

TOKENS = {"tok-h3": "H3", "tok-h2": "H2", "tok-admin": "admin"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate (localhost, 127.0.0.1) and client certificates."""
    root = tmp_path_factory.mktemp("pki")
    ca = CA("reimburse test CA")
    out = {"dir": root, "ca": ca, "ca_file": str(ca.write(root / "ca.crt"))}
    srv = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
    out["server_crt"], out["server_key"] = map(str, srv.write(root / "server"))
    for cn in ("H3", "H2", "ops-admin"):
        out[cn] = tuple(map(str, ca.issue(cn).write(root / f"client-{cn}")))
    rogue = CA("rogue CA")
    out["rogue_H3"] = tuple(map(str, rogue.issue("H3").write(root / "rogue-H3")))
    return out


@contextmanager
def secure_server(pki, *, tokens: dict | None = TOKENS, mutual: bool = False):
    ledger = MemoryLedger()
    tls = ServerTLS.from_files(pki["server_crt"], pki["server_key"],
                               pki["ca_file"] if mutual else None)
    sec = Security(tls=tls, auth=AuthConfig(
        tokens=TokenStore.of(tokens) if tokens else None, certificates=mutual,
        admin_names=frozenset({"ops-admin"})))
    server, port = create_server("127.0.0.1:0", ledger, store(), security=sec)
    server.start()
    try:
        yield f"127.0.0.1:{port}", ledger
    finally:
        server.stop(None).wait()


@pytest.fixture
def srv(pki):
    """A TLS server with bearer tokens: H3, H2 and an admin; H3, H2 and M1, M2 registered."""
    with secure_server(pki) as (target, ledger):
        with as_caller(pki, target, "tok-admin") as admin:
            for fid, level in (("H3", ty.FACILITY_LEVEL_3), ("H2", ty.FACILITY_LEVEL_2)):
                admin.call(admin.registry.UpsertFacility, reg.UpsertFacilityRequest(
                    facility=reg.Facility(facility_id=fid, level=level)))
            for mid in ("M1", "M2"):
                admin.call(admin.registry.UpsertMember, reg.UpsertMemberRequest(
                    member=reg.Member(member_id=mid, identity=ty.IDENTITY_EMPLOYEE,
                                      continuous_since=d("2010-01-01"),
                                      account_balance_fen=50_000)))
        yield target, ledger


def as_caller(pki, target: str, token: str | None = None, cert: tuple | None = None,
              ca: str | None = None) -> Client:
    return Client(target, security=ClientSecurity(
        ca=ca or pki["ca_file"], token=token, cert=cert[0] if cert else None,
        key=cert[1] if cert else None))


def code_of(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def every_method(c: Client) -> dict[str, tuple]:
    """One well-formed request for every method of our three services."""
    return {
        "PreSettle": (c.settlement.PreSettle, inpatient("", "M1", "H3", 100_000)),
        "Settle": (c.settlement.Settle, inpatient("r1", "M1", "H3", 100_000)),
        "Reverse": (c.settlement.Reverse, st.ReverseRequest(settlement_id="x",
                                                            facility_id="H3")),
        "GetSettlement": (c.settlement.GetSettlement, st.GetSettlementRequest(settlement_id="x")),
        "GetAccumulators": (c.settlement.GetAccumulators,
                            st.GetAccumulatorsRequest(member_id="M1", year=2018)),
        "UpsertMember": (c.registry.UpsertMember, reg.UpsertMemberRequest(member=reg.Member(
            member_id="M9", identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01")))),
        "GetMember": (c.registry.GetMember, reg.GetMemberRequest(member_id="M1")),
        "UpsertFacility": (c.registry.UpsertFacility, reg.UpsertFacilityRequest(
            facility=reg.Facility(facility_id="H9", level=ty.FACILITY_LEVEL_1))),
        "GetFacility": (c.registry.GetFacility, reg.GetFacilityRequest(facility_id="H3")),
        "GetPolicy": (c.policy.GetPolicy, pol.GetPolicyRequest(date=d("2018-03-01"))),
    }


def test_the_table_of_rules_covers_every_method_of_the_api():
    from reimburse.v1 import policy_pb2, registry_pb2, settlement_pb2
    methods = {f"/{s.full_name}/{m.name}"
               for f in (settlement_pb2, registry_pb2, policy_pb2)
               for s in f.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert methods <= set(auth.RULES), methods - set(auth.RULES)
    assert auth.rule_for("/reimburse.v1.SettlementService/Unknown") is auth.admin_only
    assert auth.rule_for("/grpc.health.v1.Health/Check") is None


def test_batch_requests_are_checked_item_by_item_and_unknown_shapes_fail_closed():
    """SettleBatch-like messages (repeated SettleRequest): every item must be the caller's;
    a message that names no facility at all is the admin's."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    fd = descriptor_pb2.FileDescriptorProto(
        name="tests/fake_batch.proto", package="fakebatch", syntax="proto3",
        dependency=["reimburse/v1/settlement.proto"])
    batch = fd.message_type.add(name="Batch")
    batch.field.add(name="requests", number=1, type=11, label=3,
                    type_name=".reimburse.v1.SettleRequest")
    fd.message_type.add(name="Nothing").field.add(name="x", number=1, type=9, label=1)
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(fd.name)
    except KeyError:
        pool.Add(fd)
    Batch = message_factory.GetMessageClass(pool.FindMessageTypeByName("fakebatch.Batch"))
    Nothing = message_factory.GetMessageClass(pool.FindMessageTypeByName("fakebatch.Nothing"))
    h3, admin = auth.Principal("H3"), auth.Principal(None)
    ok = Batch(requests=[inpatient("a", "M1", "H3", 1), inpatient("b", "M1", "H3", 1)])
    mixed = Batch(requests=[inpatient("a", "M1", "H3", 1), inpatient("b", "M1", "H2", 1)])
    assert auth.as_itself(h3, ok) is None and auth.as_itself(h3, Batch()) is None
    assert "requests[1].facility_id 'H2'" in auth.as_itself(h3, mixed)
    assert "names no facility" in auth.as_itself(h3, Nothing(x="H3"))
    assert auth.as_itself(admin, mixed) is None and auth.as_itself(admin, Nothing()) is None
    if hasattr(st, "SettleBatchRequest"):   # the real batch: SettleRequests or claim columns
        cols = st.SettleBatchRequest()
        cols.claims.facility_ids.extend(["H3", "H2"])
        assert "claims.facility_ids[1] 'H2'" in auth.as_itself(h3, cols)
        cols.claims.facility_ids[1] = "H3"
        assert auth.as_itself(h3, cols) is None
        reqs = st.SettleBatchRequest(requests=[inpatient("a", "M1", "H3", 1),
                                               inpatient("b", "M1", "H2", 1)])
        assert "requests[1].facility_id 'H2'" in auth.as_itself(h3, reqs)
    # a line item names no facility: 10,000 of them are not walked
    big = inpatient("a", "M1", "H3", 0)
    big.line_items.items.extend([st.LineItem(charge_class=ty.CHARGE_CLASS_A)] * 10_000)
    start = time.perf_counter()
    assert auth.as_itself(h3, big) is None
    assert time.perf_counter() - start < 0.05


# --- authentication ------------------------------------------------------------------------

def test_no_credential_is_unauthenticated_for_every_method(pki, srv):
    target, ledger = srv
    with as_caller(pki, target) as c:
        codes = {name: code_of(*call) for name, call in every_method(c).items()}
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert not list(ledger.journal())


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Basic dG9rLWgzOg==", "Bearer ",
                                    "tok-h3"])
def test_a_wrong_token_or_scheme_is_unauthenticated(pki, srv, header):
    target, _ = srv
    with Client(target, security=ClientSecurity(ca=pki["ca_file"])) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.call(c.registry.GetFacility, reg.GetFacilityRequest(facility_id="H3"),
                   metadata=[("authorization", header)])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in e.value.details() or "token" in e.value.details()


def test_health_and_reflection_are_open_without_credentials(pki, srv):
    target, _ = srv
    with as_caller(pki, target) as c:
        reply = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )
        services = ProtoReflectionDescriptorDatabase(c.channel).get_services()
    assert "reimburse.v1.SettlementService" in services


def test_a_plaintext_client_cannot_talk_to_a_tls_server(srv):
    target, _ = srv
    with Client(target, security=ClientSecurity(insecure=True, token="tok-admin")) as c:
        assert code_of(c.registry.GetFacility, reg.GetFacilityRequest(facility_id="H3")) == \
            grpc.StatusCode.UNAVAILABLE


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(pki, srv, tmp_path):
    target, _ = srv
    other = CA("someone else").write(tmp_path / "other.crt")
    with as_caller(pki, target, "tok-admin", ca=str(other)) as c:
        assert code_of(c.registry.GetFacility, reg.GetFacilityRequest(facility_id="H3")) == \
            grpc.StatusCode.UNAVAILABLE


# --- settle, pre-settle, reverse: only as itself ---------------------------------------------

@pytest.mark.parametrize("method", ["Settle", "PreSettle"])
def test_a_facility_settles_only_as_itself(pki, srv, method):
    target, ledger = srv
    with as_caller(pki, target, "tok-h3") as c:
        call = getattr(c.settlement, method)
        rid = "r1" if method == "Settle" else ""
        assert code_of(call, inpatient(rid, "M1", "H3", 100_000)) == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as e:
            call(inpatient(rid or "", "M1", "H2", 100_000), timeout=10)
        # served from its bytes (server.wire.RAW_REQUESTS): the rule still reads them, and
        # bytes that are no SettleRequest are refused as such
        raw = c.channel.unary_unary(f"/reimburse.v1.SettlementService/{method}",
                                    request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as bad:
            raw(b"\x1a\x02\xff", timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value.details()
        assert "not a valid reimburse.v1.SettleRequest" in bad.value.details()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "facility:H3" in e.value.details() and "'H2'" in e.value.details()
    assert [r.facility_id for r in ledger.journal()] == (["H3"] if method == "Settle" else [])


@pytest.mark.parametrize("method", ["SettleBatch", "PreSettleBatch"])
def test_a_facility_settles_batches_only_as_itself(pki, srv, method):
    target, ledger = srv
    with as_caller(pki, target, "tok-h3") as c:
        call = getattr(c.settlement, method, None)
        if call is None:
            pytest.skip(f"{method} is not in the API yet")
        by_request = st.SettleBatchRequest(requests=[inpatient("b1", "M1", "H3", 100_000),
                                                     inpatient("b2", "M1", "H2", 100_000)])
        by_column = st.SettleBatchRequest()
        by_column.claims.facility_ids.append("H2")
        for req in (by_request, by_column):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        raw = c.channel.unary_unary(f"/reimburse.v1.SettlementService/{method}",
                                    request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\x12\x02\xff", timeout=10)   # no message: refused, never UNKNOWN
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert not list(ledger.journal())


@pytest.mark.parametrize("method", ["SettleBatchStream", "PreSettleBatchStream"])
def test_a_facility_streams_batches_only_as_itself(pki, srv, method):
    """The rule applies to every batch of a stream as it arrives: the caller's own batches are
    answered, the first naming another facility ends the stream, PERMISSION_DENIED, and
    nothing of it or after it is settled."""
    target, ledger = srv
    own = [st.SettleBatchRequest(requests=[inpatient(f"s{k}", "M1", "H3", 100_000)])
           for k in range(2)]
    other = st.SettleBatchRequest(requests=[inpatient("s9", "M1", "H2", 100_000)])
    after = st.SettleBatchRequest(requests=[inpatient("s10", "M1", "H3", 100_000)])
    with as_caller(pki, target) as c:
        with pytest.raises(grpc.RpcError) as e:
            list(getattr(c.settlement, method)(iter(own), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with as_caller(pki, target, "tok-h3") as c:
        call = getattr(c.settlement, method)
        answered = []
        with pytest.raises(grpc.RpcError) as e:
            for r in call(iter([*own, other, after]), timeout=10):
                answered.append(r)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        assert "H2" in e.value.details()
        assert [list(r.results.code) for r in answered] == [[0], [0]]
        raw = c.channel.stream_stream(f"/reimburse.v1.SettlementService/{method}",
                                      request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(iter([b"\x12\x02\xff"]), timeout=10))   # no message: refused
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    journal = sorted(r.request_id for r in ledger.journal())
    assert journal == (["s0", "s1"] if method == "SettleBatchStream" else [])


def test_a_facility_reverses_only_its_own_settlements(pki, srv):
    target, ledger = srv
    with as_caller(pki, target, "tok-h3") as h3, as_caller(pki, target, "tok-h2") as h2:
        s = h3.call(h3.settlement.Settle, inpatient("r1", "M1", "H3", 100_000)).settlement
        # H2 naming H3 as the facility: it is not H3
        assert code_of(h2.settlement.Reverse, st.ReverseRequest(
            settlement_id=s.settlement_id, facility_id="H3")) == grpc.StatusCode.PERMISSION_DENIED
        # H2 naming itself: the settlement is not H2's (the ledger's check)
        assert code_of(h2.settlement.Reverse, st.ReverseRequest(
            settlement_id=s.settlement_id, facility_id="H2")) == grpc.StatusCode.PERMISSION_DENIED
        assert ledger.get_settlement(s.settlement_id).status == "SETTLED"
        rev = h3.call(h3.settlement.Reverse, st.ReverseRequest(settlement_id=s.settlement_id,
                                                               facility_id="H3"))
    assert rev.settlement.status == ty.SETTLEMENT_STATUS_REVERSED


def test_a_facility_reads_only_its_own_settlements(pki, srv):
    target, _ = srv
    with as_caller(pki, target, "tok-h3") as h3, as_caller(pki, target, "tok-h2") as h2:
        s = h3.call(h3.settlement.Settle, inpatient("r1", "M1", "H3", 100_000)).settlement
        got = h3.call(h3.settlement.GetSettlement,
                      st.GetSettlementRequest(settlement_id=s.settlement_id)).settlement
        assert got == s
        with pytest.raises(grpc.RpcError) as e:
            h2.call(h2.settlement.GetSettlement,
                    st.GetSettlementRequest(settlement_id=s.settlement_id))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "another facility" in e.value.details()


def test_replaying_anothers_request_id_is_another_settlement_not_a_leak(pki, srv):
    """(facility, request id) is the key: H2 using H3's request id gets its own settlement,
    never H3's stored reply."""
    target, _ = srv
    with as_caller(pki, target, "tok-h3") as h3, as_caller(pki, target, "tok-h2") as h2:
        a = h3.call(h3.settlement.Settle, inpatient("same", "M1", "H3", 100_000))
        b = h2.call(h2.settlement.Settle, inpatient("same", "M1", "H2", 100_000))
    assert not b.replayed and b.settlement.settlement_id != a.settlement.settlement_id


# --- reads open to every facility ----------------------------------------------------------

@pytest.mark.parametrize("name", ["GetAccumulators", "GetMember", "GetFacility", "GetPolicy"])
def test_members_accumulators_facilities_and_policies_are_readable_by_any_facility(pki, srv,
                                                                                  name):
    target, _ = srv
    with as_caller(pki, target, "tok-h2") as c:
        call, request = every_method(c)[name]
        assert code_of(call, request) == grpc.StatusCode.OK


# --- administration -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["UpsertMember", "UpsertFacility"])
def test_registry_writes_need_the_admin_credential(pki, srv, name):
    target, ledger = srv
    with as_caller(pki, target, "tok-h3") as c:
        assert code_of(*every_method(c)[name]) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Exception):
        ledger.get_member("M9") if name == "UpsertMember" else ledger.get_facility("H9")
    with as_caller(pki, target, "tok-admin") as c:
        assert code_of(*every_method(c)[name]) == grpc.StatusCode.OK


def test_admin_may_act_for_any_facility(pki, srv):
    target, _ = srv
    with as_caller(pki, target, "tok-h3") as h3, as_caller(pki, target, "tok-admin") as admin:
        s = h3.call(h3.settlement.Settle, inpatient("r1", "M1", "H3", 100_000)).settlement
        assert code_of(admin.settlement.GetSettlement,
                       st.GetSettlementRequest(settlement_id=s.settlement_id)) == \
            grpc.StatusCode.OK
        assert code_of(admin.settlement.Settle, inpatient("a1", "M2", "H2", 100_000)) == \
            grpc.StatusCode.OK


def test_cli_import_needs_admin_and_passes_tokens_from_a_file(pki, srv, tmp_path, capsys):
    from server.cli import main
    target, ledger = srv
    csv = tmp_path / "facilities.csv"
    csv.write_text("facility_id,level\nP7,LEVEL_1\n", encoding="utf-8")
    for who, tok in (("h3", "tok-h3"), ("admin", "tok-admin")):
        (tmp_path / who).write_text(tok + "\n", encoding="utf-8")
    base = ["--target", target, "--ca", pki["ca_file"]]
    assert main([*base, "--token-file", str(tmp_path / "h3"), "import", "facilities",
                 str(csv)]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main([*base, "--token-file", str(tmp_path / "admin"), "import", "facilities",
                 str(csv)]) == 0
    assert ledger.get_facility("P7").level == "LEVEL_1"
    assert main(["--target", target, "facility", "P7"]) == 2
    assert "--insecure" in capsys.readouterr().err  # no silent plaintext


# --- mutual TLS ------------------------------------------------------------------------------

@pytest.fixture
def mtls(pki):
    with secure_server(pki, tokens=None, mutual=True) as (target, ledger):
        with as_caller(pki, target, cert=pki["ops-admin"]) as admin:
            admin.call(admin.registry.UpsertFacility, reg.UpsertFacilityRequest(
                facility=reg.Facility(facility_id="H3", level=ty.FACILITY_LEVEL_3)))
            admin.call(admin.registry.UpsertMember, reg.UpsertMemberRequest(
                member=reg.Member(member_id="M1", identity=ty.IDENTITY_EMPLOYEE,
                                  continuous_since=d("2010-01-01"))))
        yield target, ledger


def test_mtls_the_certificate_cn_is_the_facility(pki, mtls):
    target, ledger = mtls
    with as_caller(pki, target, cert=pki["H3"]) as h3:
        assert code_of(h3.settlement.Settle, inpatient("r1", "M1", "H3", 100_000)) == \
            grpc.StatusCode.OK
        assert code_of(h3.settlement.Settle, inpatient("r2", "M1", "H2", 100_000)) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert code_of(*every_method(h3)["UpsertFacility"]) == grpc.StatusCode.PERMISSION_DENIED
    assert [r.request_id for r in ledger.journal()] == ["r1"]


def test_mtls_without_a_certificate_or_with_a_foreign_one_cannot_connect(pki, mtls):
    """gRPC for Python cannot make client certificates optional: the handshake fails, so the
    caller sees UNAVAILABLE (never reaches a method), health checks included."""
    target, _ = mtls
    for cert in (None, pki["rogue_H3"]):
        with as_caller(pki, target, cert=cert) as c:
            assert code_of(c.registry.GetFacility, reg.GetFacilityRequest(facility_id="H3")) \
                == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)


def test_mtls_a_bearer_token_is_refused_when_the_server_takes_none(pki, mtls):
    target, _ = mtls
    with as_caller(pki, target, token="tok-admin", cert=pki["H3"]) as c:
        assert code_of(*every_method(c)["UpsertFacility"]) == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_and_certificates_together_the_token_names_the_caller(pki):
    with secure_server(pki, mutual=True) as (target, ledger):
        with as_caller(pki, target, token="tok-admin", cert=pki["H3"]) as c:
            assert code_of(*every_method(c)["UpsertFacility"]) == grpc.StatusCode.OK
        with as_caller(pki, target, cert=pki["H3"]) as c:
            assert code_of(*every_method(c)["UpsertFacility"]) == \
                grpc.StatusCode.PERMISSION_DENIED
        with as_caller(pki, target, token="nope", cert=pki["ops-admin"]) as c:
            assert code_of(*every_method(c)["GetPolicy"]) == grpc.StatusCode.UNAUTHENTICATED


# --- the tokens file ---------------------------------------------------------------------------

def test_tokens_file_holds_hashes_and_server_auth_add_makes_tokens(tmp_path):
    path = tmp_path / "tokens"
    out = subprocess.run([sys.executable, "-m", "server.auth", "add", "--tokens", str(path),
                          "--facility", "H3", "--comment", "Central Hospital billing"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "server.auth", "add", "--tokens", str(path),
                    "--admin"], cwd=ROOT, capture_output=True, check=True)
    text = path.read_text()
    assert out and out not in text and auth.hash_token(out) in text
    assert (path.stat().st_mode & 0o077) == 0
    store_ = TokenStore.load(path)
    assert len(store_) == 2 and store_.lookup(out) == auth.Principal("H3")
    hashed = subprocess.run([sys.executable, "-m", "server.auth", "hash", "--admin"], cwd=ROOT,
                            input="s3cret\n", capture_output=True, text=True, check=True)
    assert hashed.stdout == f"{auth.hash_token('s3cret')} admin\n"


@pytest.mark.parametrize("line,words", [
    ("tok-h3 facility H3", "hash of the token"),
    ("sha256:" + "0" * 63 + " admin", "64 hex"),
    ("sha256:" + "0" * 64, "'admin' or 'facility"),
    ("sha256:" + "0" * 64 + " facility", "'admin' or 'facility"),
    ("sha256:" + "0" * 64 + " root", "'admin' or 'facility"),
])
def test_a_bad_tokens_file_is_refused_naming_the_line(line, words):
    with pytest.raises(ValueError) as e:
        auth.parse_tokens(f"# ok\n{line}\n", "tokens")
    assert "tokens:2" in str(e.value) and words in str(e.value)


def test_a_changed_tokens_file_is_reloaded_so_tokens_can_be_revoked(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text(f"{auth.hash_token('old')} facility H3\n")
    s = TokenStore.load(path)
    assert s.lookup("old") == auth.Principal("H3")
    path.write_text(f"{auth.hash_token('new')} facility H3\n")
    clock = [time.monotonic() + 5]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    assert s.lookup("old") is None and s.lookup("new") == auth.Principal("H3")
    path.write_text("garbage\n")                   # a broken edit keeps the last good set
    clock[0] += 5
    assert s.lookup("new") == auth.Principal("H3")


# --- logging -----------------------------------------------------------------------------------

def test_calls_are_logged_with_their_caller_and_refusals_too(pki, srv, caplog):
    caplog.set_level(logging.INFO, logger="reimburse.rpc")
    target, _ = srv
    with as_caller(pki, target, "tok-h3") as c:
        c.call(c.registry.GetMember, reg.GetMemberRequest(member_id="M1"))
        code_of(c.settlement.Settle, inpatient("r9", "M1", "H2", 100_000))
    with as_caller(pki, target) as c:
        code_of(c.registry.GetMember, reg.GetMemberRequest(member_id="M1"))
    lines = [r.msg for r in caplog.records if r.name == "reimburse.rpc"
             and isinstance(r.msg, dict)]
    ok = [x for x in lines if x["method"] == "GetMember" and x["code"] == "OK"]
    assert ok and ok[0]["caller"] == "facility:H3"
    denied = [x for x in lines if x["code"] == "PERMISSION_DENIED"]
    assert denied and denied[0]["method"] == "Settle" and denied[0]["caller"] == "facility:H3"
    assert any(x["code"] == "UNAUTHENTICATED" and x["method"] == "GetMember" for x in lines)
    assert not any("tok-h3" in json.dumps(x) for x in lines)


# --- python -m server: secure by default ---------------------------------------------------------

def test_the_server_refuses_to_start_without_security_or_insecure():
    r = subprocess.run([sys.executable, "-m", "server", "--listen", "127.0.0.1:0",
                        "--database", "memory://"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in __import__("os").environ.items()
                                        if not k.startswith("REIMBURSE_")})
    assert r.returncode == 2
    rec = json.loads(r.stderr.strip().splitlines()[-1])
    assert rec["event"] == "cannot start" and "--insecure" in rec["error"]
    assert "--tls-cert" in rec["error"] and "--tokens" in rec["error"]


def test_insecure_mode_says_so_loudly_in_the_log():
    p = ServerProcess("memory://")
    try:
        warn = p.wait_for(lambda r: r.get("event") == "INSECURE")
        assert warn["level"] == "WARNING" and "INSECURE MODE" in warn["warning"]
        assert p.wait_for(lambda r: r.get("event") == "listening")["tls"] == "off"
    finally:
        assert p.stop() == 0


def test_a_tls_server_process_with_tokens(pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{auth.hash_token('adm')} admin\n{auth.hash_token('h3')} facility H3\n")
    p = ServerProcess("memory://", "--tls-cert", pki["server_crt"], "--tls-key",
                      pki["server_key"], "--tokens", str(tokens), insecure=False)
    try:
        listening = p.wait_for(lambda r: r.get("event") == "listening")
        assert listening["tls"] == "on" and listening["auth"] == "tokens"
        assert not any(r.get("event") == "INSECURE" for r in p.records())
        hc = [sys.executable, "-m", "server.healthcheck", "--target", p.target]
        assert subprocess.run([*hc, "--ca", pki["ca_file"]], cwd=ROOT).returncode == 0
        assert subprocess.run([*hc, "--insecure"], cwd=ROOT,
                              capture_output=True).returncode == 1
        bare = subprocess.run(hc, cwd=ROOT, capture_output=True, text=True,
                              env={k: v for k, v in __import__("os").environ.items()
                                   if not k.startswith("REIMBURSE_")})
        assert bare.returncode == 1 and "--insecure" in bare.stderr
        with as_caller(pki, p.target, "adm") as c:
            c.call(c.registry.UpsertFacility, reg.UpsertFacilityRequest(
                facility=reg.Facility(facility_id="H3", level=ty.FACILITY_LEVEL_3)))
        with as_caller(pki, p.target, "h3") as c:
            assert code_of(*every_method(c)["UpsertFacility"]) == \
                grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert p.stop() == 0


def test_a_mutual_tls_server_process_and_its_health_probe(pki):
    p = ServerProcess("memory://", "--tls-cert", pki["server_crt"], "--tls-key",
                      pki["server_key"], "--tls-client-ca", pki["ca_file"],
                      "--tls-admin-cn", "ops-admin", insecure=False)
    try:
        assert p.wait_for(lambda r: r.get("event") == "listening")["auth"] == "certificates"
        hc = [sys.executable, "-m", "server.healthcheck", "--target", p.target, "--ca",
              pki["ca_file"]]
        assert subprocess.run([*hc, "--cert", pki["ops-admin"][0], "--key",
                               pki["ops-admin"][1]], cwd=ROOT).returncode == 0
        assert subprocess.run(hc, cwd=ROOT, capture_output=True).returncode == 1
    finally:
        assert p.stop() == 0


@pytest.mark.parametrize("args,words", [
    (["--tls-cert", "x.crt"], "go together"),
    (["--tls-client-ca", "ca.crt", "--insecure"], "needs --tls-cert"),
    (["--tokens", "/nonexistent/tokens"], "No such file"),
])
def test_incomplete_security_options_are_refused(args, words):
    r = subprocess.run([sys.executable, "-m", "server", "--listen", "127.0.0.1:0",
                        "--database", "memory://", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr
