"""Transport security, scoped credentials and limits of the API, on a real in-process server (issue 15).

TLS tests use a throwaway CA made with ``cryptography`` (:mod:`tests.service.certs`). Role and limit tests
run the server around the scripted engine of :mod:`tests.service.api_fixtures`, so they take milliseconds
and never depend on job timing; what needs the real engine (dataset roots, the id rule of intake) uses the
session's engine.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service import domain
from service.api import errors
from service.api.auth import credentials_line, parse_credentials
from service.api.client import Client, field_violations
from service.api.pb import SERVICE_NAME, service_pb2, types_pb2
from service.api.tls import channel_credentials
from service.domain import Role
from service.settings import Settings
from tests.service.api_fixtures import ScriptedEngine, running_api
from tests.service.certs import make_ca, server_pair, write_pair

pytestmark = pytest.mark.security

TOKENS = {  # identity -> (roles, token)
    "governance": ("submitter", "tok-governance-0123456789"),
    "other-team": ("submitter", "tok-other-team-0123456789"),
    "audit": ("auditor", "tok-audit-0123456789"),
    "ops": ("operator", "tok-ops-0123456789"),
}


def _bearer(token: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


def _write_tokens(path: Path, tokens: dict[str, tuple[str, str]] = TOKENS, extra: str = "") -> Path:
    lines = ["# role name credential"] + [credentials_line([Role(r) for r in roles.split(",")], name, token)
                                           for name, (roles, token) in tokens.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def scoped(tmp_path):
    """A server with the scoped credentials of TOKENS around a scripted engine (its metrics: ``api.registry``)."""
    from prometheus_client import CollectorRegistry

    settings = Settings(state_dir=tmp_path / "state", auth_tokens_file=_write_tokens(tmp_path / "tokens"))
    engine = ScriptedEngine()
    registry = CollectorRegistry()
    with running_api(settings, engine, metrics_registry=registry) as api:
        api.registry = registry
        yield api, engine


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# ------------------------------------------------------------------------------------------ TLS and mTLS
@pytest.fixture
def pki(tmp_path):
    """A CA, the server's pair, a client pair from the CA, a client pair from another CA."""
    ca, other = make_ca("lethe-test-ca"), make_ca("someone-else")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "other-ca.crt").write_bytes(other.cert_pem)
    server = write_pair(tmp_path / "server", server_pair(ca))
    client = write_pair(tmp_path / "client", ca.issue("governance", client=True))
    stranger = write_pair(tmp_path / "stranger", other.issue("governance", client=True))
    return {"dir": tmp_path, "ca": ca, "other": other, "ca_file": tmp_path / "ca.crt", "server": server,
            "client": client, "stranger": stranger}


def _health(target: str, credentials=None) -> grpc.StatusCode | int:
    with Client(target, credentials=credentials) as client:
        try:
            return health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as error:
            return error.code()


def test_tls_server_refuses_plaintext_and_serves_tls(pki):
    cert, key = pki["server"]
    settings = Settings(state_dir=pki["dir"] / "state", tls_cert=cert, tls_key=key)
    with running_api(settings, ScriptedEngine(), credentials=channel_credentials(pki["ca_file"])) as api:
        target = f"127.0.0.1:{api.api.port}"
        assert _health(target) == grpc.StatusCode.UNAVAILABLE  # plaintext: the handshake fails
        assert _health(target, channel_credentials(pki["ca_file"])) == health_pb2.HealthCheckResponse.SERVING
        # A server certificate from a CA the client does not trust is refused by the client.
        assert _health(target, channel_credentials(pki["dir"] / "other-ca.crt")) == grpc.StatusCode.UNAVAILABLE
        assert api.stub.ListJobs(service_pb2.ListJobsRequest()) is not None


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_client_ca(pki):
    cert, key = pki["server"]
    settings = Settings(state_dir=pki["dir"] / "state", tls_cert=cert, tls_key=key, tls_client_ca=pki["ca_file"])
    good = channel_credentials(pki["ca_file"], *pki["client"])
    with running_api(settings, ScriptedEngine(), credentials=good) as api:
        target = f"127.0.0.1:{api.api.port}"
        assert _health(target) == grpc.StatusCode.UNAVAILABLE
        assert _health(target, channel_credentials(pki["ca_file"])) == grpc.StatusCode.UNAVAILABLE  # no cert
        assert _health(target, channel_credentials(pki["ca_file"], *pki["stranger"])) == grpc.StatusCode.UNAVAILABLE
        assert _health(target, good) == health_pb2.HealthCheckResponse.SERVING


def test_certificate_rotation_is_picked_up_without_a_restart(pki):
    """cert-manager replaces the files: the next handshake uses the new pair (here from a new CA, so the
    old one cannot be what answers); a half-written pair keeps the previous one."""
    cert, key = pki["server"]
    settings = Settings(state_dir=pki["dir"] / "state", tls_cert=cert, tls_key=key)
    with running_api(settings, ScriptedEngine(), credentials=channel_credentials(pki["ca_file"])) as api:
        target = f"127.0.0.1:{api.api.port}"
        assert _health(target, channel_credentials(pki["ca_file"])) == health_pb2.HealthCheckResponse.SERVING

        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf")  # a rotation caught mid-write
        assert _health(target, channel_credentials(pki["ca_file"])) == health_pb2.HealthCheckResponse.SERVING

        rotated_ca = make_ca("rotated-ca")
        (pki["dir"] / "rotated-ca.crt").write_bytes(rotated_ca.cert_pem)
        new_dir = pki["dir"] / "rotated"
        new_cert, new_key = write_pair(new_dir, server_pair(rotated_ca))
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        assert _health(target, channel_credentials(pki["dir"] / "rotated-ca.crt")) == \
            health_pb2.HealthCheckResponse.SERVING
        assert _health(target, channel_credentials(pki["ca_file"])) == grpc.StatusCode.UNAVAILABLE
        assert api.api.certificates.reloads >= 1


def test_health_probe_cli_speaks_mutual_tls_with_the_pods_own_files(pki, monkeypatch, capsys):
    """``lethe health`` as a Kubernetes exec probe: the same LETHE_TLS_* files as the server, a loopback
    target, the server name taken from the certificate, no credentials."""
    from service.cli import main

    cert, key = pki["server"]
    settings = Settings(state_dir=pki["dir"] / "state", tls_cert=cert, tls_key=key, tls_client_ca=pki["ca_file"],
                        auth_token="never-sent-by-the-probe")
    with running_api(settings, ScriptedEngine(), credentials=channel_credentials(pki["ca_file"], *pki["client"])) as api:
        for name, value in (("LETHE_TLS_CERT", cert), ("LETHE_TLS_KEY", key), ("LETHE_TLS_CLIENT_CA", pki["ca_file"])):
            monkeypatch.setenv(name, str(value))
        monkeypatch.delenv("LETHE_AUTH_TOKEN", raising=False)
        assert main(["health", "--target", f"127.0.0.1:{api.api.port}"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        monkeypatch.delenv("LETHE_TLS_CERT")
        monkeypatch.delenv("LETHE_TLS_KEY")
        assert main(["health", "--target", f"127.0.0.1:{api.api.port}", "--timeout-s", "2"]) == 2  # no client cert


def test_mutual_tls_certificate_names_map_to_identities(pki):
    cert, key = pki["server"]
    tokens = _write_tokens(pki["dir"] / "tokens", extra="submitter governance x509-cn:governance\n")
    settings = Settings(state_dir=pki["dir"] / "state", tls_cert=cert, tls_key=key, tls_client_ca=pki["ca_file"],
                        auth_tokens_file=tokens)
    with running_api(settings, ScriptedEngine(), credentials=channel_credentials(pki["ca_file"], *pki["client"])) as api:
        erasure = types_pb2.Erasure(request_id="mtls-1", subject_ids=["s"])
        assert api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=erasure)).accepted.created
        assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest()) == grpc.StatusCode.PERMISSION_DENIED
        # The same certificate with an auditor's token acts as the auditor: the token decides.
        assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(TOKENS["audit"][1])) == \
            grpc.StatusCode.OK
        unmapped = channel_credentials(pki["ca_file"], *write_pair(pki["dir"] / "anon", pki["ca"].issue(
            "nobody", client=True)))
        with Client(f"127.0.0.1:{api.api.port}", credentials=unmapped) as stranger:
            assert _code(stranger.stub.ListJobs, service_pb2.ListJobsRequest()) == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------------------------------ credentials
def _call_with_empty_request(api, method_name: str, metadata):
    method = service_pb2.DESCRIPTOR.services_by_name["UnlearningService"].methods_by_name[method_name]
    stub_call = getattr(api.stub, method_name)
    if method.client_streaming:
        return _code(stub_call, iter([]), metadata=metadata, timeout=5)
    return _code(stub_call, method.input_type._concrete_class(), metadata=metadata, timeout=5)


def test_the_role_table_covers_every_rpc_and_is_enforced(scoped):
    api, _ = scoped
    served = service_pb2.DESCRIPTOR.services_by_name["UnlearningService"].methods
    assert {f"/{SERVICE_NAME}/{m.name}" for m in served} <= set(errors.ALLOWED_ROLES)
    for operator_control in ("CancelRequest", "RetryRequest", "CloseRequest"):
        assert errors.ALLOWED_ROLES[f"/{SERVICE_NAME}/{operator_control}"] == {Role.OPERATOR}
    for method in served:
        allowed = errors.ALLOWED_ROLES[f"/{SERVICE_NAME}/{method.name}"]
        for name, (role, token) in TOKENS.items():
            code = _call_with_empty_request(api, method.name, _bearer(token))
            if Role(role) in allowed:
                assert code != grpc.StatusCode.PERMISSION_DENIED, (method.name, role)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, role, code)


def test_credentials_refusals_are_uniform_counted_and_say_nothing(tmp_path):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    settings = Settings(state_dir=tmp_path / "state", auth_tokens_file=_write_tokens(tmp_path / "tokens"))
    with running_api(settings, ScriptedEngine(), metrics_registry=registry) as api:
        request = service_pb2.ListPendingRequestsRequest()
        details = set()
        for metadata in ((), _bearer("wrong"), _bearer(TOKENS["ops"][1], "Basic"), (("authorization", "Bearer"),),
                         (("authorization", TOKENS["ops"][1]),),
                         (("authorization", f"Bearer {TOKENS['ops'][1]}"), ("authorization", "Bearer x"))):
            with pytest.raises(grpc.RpcError) as refused:
                api.stub.ListPendingRequests(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            details.add(refused.value.details())
        assert details == {"missing or invalid credentials"}
        with pytest.raises(grpc.RpcError) as denied:
            api.stub.ListPendingRequests(request, metadata=_bearer(TOKENS["governance"][1]))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "auditor" not in denied.value.details() and "operator" not in denied.value.details()
    method = f"/{SERVICE_NAME}/ListPendingRequests"
    assert registry.get_sample_value("lethe_grpc_auth_refusals_total",
                                     {"grpc_method": method, "grpc_code": "UNAUTHENTICATED"}) == 6
    assert registry.get_sample_value("lethe_grpc_auth_refusals_total",
                                     {"grpc_method": method, "grpc_code": "PERMISSION_DENIED"}) == 1


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scoped, scheme):
    api, _ = scoped
    assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(TOKENS["audit"][1], scheme)) \
        == grpc.StatusCode.OK


def test_tokens_rotate_several_valid_at_once_and_the_file_reloads_without_restart(tmp_path, monkeypatch):
    import service.api.auth as auth

    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    tokens_file = _write_tokens(tmp_path / "tokens")
    settings = Settings(state_dir=tmp_path / "state", auth_tokens_file=tokens_file)
    with running_api(settings, ScriptedEngine()) as api:
        new = "tok-audit-rotated-9876543210"
        assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(new)) == \
            grpc.StatusCode.UNAUTHENTICATED
        with tokens_file.open("a") as handle:  # the new token beside the old one
            handle.write(credentials_line([Role.AUDITOR], "audit", new) + "\n")
        for token in (new, TOKENS["audit"][1]):
            assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(token)) == grpc.StatusCode.OK
        _write_tokens(tokens_file, {"audit": ("auditor", new)})  # the old one retired
        assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(TOKENS["audit"][1])) == \
            grpc.StatusCode.UNAUTHENTICATED
        tokens_file.write_text("operator broken-line\n")  # a bad edit keeps the last good credentials
        assert _code(api.stub.ListJobs, service_pb2.ListJobsRequest(), metadata=_bearer(new)) == grpc.StatusCode.OK
    assert "sha256:" + "0" * 64 not in tokens_file.read_text()


def test_tokens_file_stores_digests_and_bad_lines_name_only_their_number():
    token = "a-secret-token"
    line = credentials_line([Role.SUBMITTER, Role.AUDITOR], "gov", token)
    assert token not in line and line.startswith("auditor,submitter gov sha256:")
    parsed = parse_credentials(line)
    assert parsed.tokens[0][1].roles == {Role.SUBMITTER, Role.AUDITOR}
    for bad in ("submitter gov", "admin gov sha256:" + "0" * 64, "submitter gov sha256:abc",
                f"submitter gov plain:{token}"):
        with pytest.raises(ValueError) as refused:
            parse_credentials("# header\n" + bad)
        assert "line 2" in str(refused.value) and token not in str(refused.value)


def test_unknown_methods_authenticate_first_then_answer_unimplemented(scoped):
    api, _ = scoped
    for method in ("/lethe.v1.UnlearningService/DropAllTables", "/no.such.Service/Call",
                   "/grpc.health.v1.Health/Secret"):
        call = api.client.channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as anonymous:
            call(b"", timeout=5)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        with pytest.raises(grpc.RpcError) as known:
            call(b"", metadata=_bearer(TOKENS["governance"][1]), timeout=5)
        assert known.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    health = health_pb2_grpc.HealthStub(api.client.channel)  # health checks need no credentials
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_a_submitter_reads_only_its_own_requests(scoped):
    api, engine = scoped
    mine, theirs, auditor = (_bearer(TOKENS[n][1]) for n in ("governance", "other-team", "audit"))
    accepted = api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(
        erasure=types_pb2.Erasure(request_id="own-1", subject_ids=["s1"])), metadata=mine).accepted
    (job_id,) = accepted.job_ids
    engine.succeed(job_id)

    assert api.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), metadata=mine).job.request_ids == ["own-1"]
    assert api.stub.GetCertificate(service_pb2.GetCertificateRequest(request_id="own-1"), metadata=mine).certificates
    assert [r.event.kind for r in api.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), metadata=mine,
                                                     timeout=5)][-1] == types_pb2.EVENT_KIND_TERMINAL
    assert api.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), metadata=auditor).job.job_id == job_id

    # Another submitter: the same answer for this job and for one that does not exist.
    answers = set()
    for job in (job_id, "job-that-never-was"):
        for call, request in ((api.stub.GetJob, service_pb2.GetJobRequest(job_id=job)),
                              (api.stub.WatchJob, service_pb2.WatchJobRequest(job_id=job))):
            with pytest.raises(grpc.RpcError) as refused:
                result = call(request, metadata=theirs, timeout=5)
                list(result) if hasattr(result, "__next__") else None
            answers.add((refused.value.code(), refused.value.details()))
    for request_id in ("own-1", "request-that-never-was"):
        with pytest.raises(grpc.RpcError) as refused:
            api.stub.GetCertificate(service_pb2.GetCertificateRequest(request_id=request_id), metadata=theirs)
        answers.add((refused.value.code(), refused.value.details()))
    assert answers == {(grpc.StatusCode.PERMISSION_DENIED, "no such job or request for this caller")}

    # On the stream: resuming another's request, or everything, is refused per message.
    responses = list(api.stub.Session(iter([
        service_pb2.SessionRequest(resume=service_pb2.Resume(request_ids=["own-1", "request-that-never-was"])),
        service_pb2.SessionRequest(resume=service_pb2.Resume(all_requests=True))]), metadata=theirs, timeout=5))
    assert [(r.rejected.request_id, r.rejected.code) for r in responses] == [
        ("own-1", grpc.StatusCode.PERMISSION_DENIED.value[0]),
        ("request-that-never-was", grpc.StatusCode.PERMISSION_DENIED.value[0]),
        ("", grpc.StatusCode.PERMISSION_DENIED.value[0])]
    refusals = {method: api.registry.get_sample_value("lethe_grpc_auth_refusals_total", {
        "grpc_method": f"/{SERVICE_NAME}/{method}", "grpc_code": "PERMISSION_DENIED"})
        for method in ("GetJob", "WatchJob", "GetCertificate", "Session")}
    assert refusals == {"GetJob": 2, "WatchJob": 2, "GetCertificate": 2, "Session": 3}  # every refusal counted
    # Re-using another identity's request id, even with the same payload, reveals nothing about it.
    with pytest.raises(grpc.RpcError) as reused:
        api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(
            erasure=types_pb2.Erasure(request_id="own-1", subject_ids=["s1"])), metadata=theirs)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS and job_id not in reused.value.details()


def test_coalesced_jobs_show_a_submitter_only_its_own_requests():
    from datetime import datetime, timezone

    from service.api.auth import Identity
    from service.api.limits import ApiLimits
    from service.api.scope import Scope

    class Owners(ScriptedEngine):
        def request_owners(self, request_ids):
            return {r: ("hash-a" if r.startswith("a-") else "hash-b") for r in request_ids}

        def get_job(self, job_id):
            now = datetime.now(timezone.utc)
            return domain.JobView(job_id, "m", "1", domain.JobState.RUNNING, "apply", 0.5, "ssd", ("a-1", "b-1"), 2,
                                  now, now, None, "", {})

    scope = Scope(Owners(), Identity("a", frozenset({Role.SUBMITTER}), "hash-a"), ApiLimits())
    assert scope.job("job-1").request_ids == ("a-1",)
    now = datetime.now(timezone.utc)
    progress = domain.JobEvent(5, "job-1", ("a-1", "b-1"), domain.EventKind.PROGRESS, domain.JobState.RUNNING,
                               "apply", 0.5, "", now)
    assert scope.event(progress, {"a-1"}).request_ids == ("a-1",)
    theirs = domain.JobEvent(6, "job-1", ("b-1",), domain.EventKind.TERMINAL, domain.JobState.SUCCEEDED, "audit", 1.0,
                             "", now, domain.Certificate("b-1", "{}", "0" * 64))
    assert scope.event(theirs, {"a-1"}) is None
    auditor = Scope(Owners(), Identity("x", frozenset({Role.AUDITOR}), "hash-x"), ApiLimits())
    assert auditor.job("job-1").request_ids == ("a-1", "b-1") and auditor.event(theirs, set()) is theirs


# ------------------------------------------------------------------------------------------ limits
def _retry_delay_s(error: grpc.RpcError) -> float | None:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def test_rate_limit_per_identity_answers_resource_exhausted_with_retry_info(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", auth_tokens_file=_write_tokens(tmp_path / "tokens"),
                        rate_limit_per_s=0.5, rate_limit_burst=3)
    with running_api(settings, ScriptedEngine()) as api:
        audit, ops = _bearer(TOKENS["audit"][1]), _bearer(TOKENS["ops"][1])
        for _ in range(3):
            api.stub.ListJobs(service_pb2.ListJobsRequest(), metadata=audit)
        with pytest.raises(grpc.RpcError) as limited:
            api.stub.ListJobs(service_pb2.ListJobsRequest(), metadata=audit)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < _retry_delay_s(limited.value) <= 2.0
        assert api.stub.ListJobs(service_pb2.ListJobsRequest(), metadata=ops) is not None  # its own bucket
        health = health_pb2_grpc.HealthStub(api.client.channel)
        for _ in range(5):  # probes are never limited
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING

        # On the Session, a message over the limit is rejected in band with retry_delay; the stream stays open.
        # Opening the stream takes one token of the fresh bucket (3), each message another: of 6 empty Resumes
        # (they watch nothing, so the stream ends when the client does) the last ones are rejected in band.
        submitter = _bearer(TOKENS["governance"][1])
        resumes = [service_pb2.SessionRequest(resume=service_pb2.Resume()) for _ in range(6)]
        responses = list(api.stub.Session(iter(resumes), metadata=submitter, timeout=10))
        rejected = [r.rejected for r in responses if r.WhichOneof("message") == "rejected"]
        assert 3 <= len(rejected) <= 4 and len(responses) == len(rejected)
        assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and r.retry_delay.ToNanoseconds() > 0
                   for r in rejected)


def test_streams_per_identity_are_capped(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", auth_tokens_file=_write_tokens(tmp_path / "tokens"),
                        max_streams_per_identity=1)
    with running_api(settings, ScriptedEngine()) as api:
        mine, theirs = _bearer(TOKENS["governance"][1]), _bearer(TOKENS["other-team"][1])
        release = threading.Event()

        def idle():
            release.wait(10)
            return
            yield

        held = api.stub.Session(idle(), metadata=mine, timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the server has taken the first stream's slot
            code = _code(api.stub.Session, iter([]), metadata=mine, timeout=5)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            time.sleep(0.05)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _code(api.stub.Session, iter([]), metadata=theirs, timeout=5) == grpc.StatusCode.OK
        release.set()
        list(held)
        assert _code(api.stub.Session, iter([]), metadata=mine, timeout=5) == grpc.StatusCode.OK


def test_unacknowledged_submissions_are_capped_and_the_reader_stops(tmp_path):
    """A client that sends without reading: beyond max_unacked_messages unread answers its submissions are
    refused RESOURCE_EXHAUSTED (nothing stored), and at twice that the server stops reading."""
    from service.api.limits import ApiLimits
    from service.api.scope import Scope
    from service.api.session import SessionStream

    class Context:
        def add_callback(self, callback):
            return True

        def is_active(self):
            return True

    engine = ScriptedEngine()
    sent = []

    def submissions():
        for index in range(20):
            sent.append(index)
            yield service_pb2.SessionRequest(erasure=types_pb2.Erasure(request_id=f"ua-{index}", subject_ids=["s"]))

    stream = SessionStream(engine, submissions(), Context(), 0.05, Scope(engine, None, ApiLimits(max_unacked_messages=3)))
    responses = stream.responses()
    first = next(responses)  # starts the reader and the poller; the "client" now stops reading
    deadline = time.monotonic() + 5
    while len(sent) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(sent) <= 8, "the reader kept reading although nobody reads the answers"
    rest = []
    for response in responses:  # the client reads again: the reader resumes and finishes
        rest.append(response)
        if len([r for r in [first, *rest] if r.WhichOneof("message") in ("accepted", "rejected")]) == 20:
            break
    answers = [r for r in [first, *rest] if r.WhichOneof("message") in ("accepted", "rejected")]
    refused = [r.rejected for r in answers if r.WhichOneof("message") == "rejected"]
    assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and r.retry_delay.ToNanoseconds()
                           for r in refused)
    assert engine.submit_calls == 20 - len(refused)  # a refused submission never reached the engine
    stream._on_rpc_done()


def test_oversized_messages_are_refused_before_decoding(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", max_message_bytes=1024)
    engine = ScriptedEngine()
    with running_api(settings, engine) as api:
        big = types_pb2.Erasure(request_id="big", subject_ids=[f"subject-{i:05d}" for i in range(200)])
        assert _code(api.stub.SubmitErasure, service_pb2.SubmitErasureRequest(erasure=big)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert engine.submit_calls == 0


def test_unary_calls_have_a_server_side_deadline_and_a_late_commit_replays(tmp_path):
    class Slow(ScriptedEngine):
        def submit_erasure(self, request):
            outcome = super().submit_erasure(request)
            if outcome.created:
                time.sleep(1.0)  # commits, then is slow to answer
            return outcome

    settings = Settings(state_dir=tmp_path / "state", unary_deadline_s=0.2)
    engine = Slow()
    with running_api(settings, engine) as api:
        request = service_pb2.SubmitErasureRequest(erasure=types_pb2.Erasure(request_id="late-1", subject_ids=["s"]))
        with pytest.raises(grpc.RpcError) as late:
            api.stub.SubmitErasure(request)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "same request_id" in late.value.details()
        replay = api.stub.SubmitErasure(request).accepted  # the documented recovery: replay, same id
        assert not replay.created and list(replay.job_ids) == ["job-1"]


# ------------------------------------------------------------------------------------------ hostile ids
HOSTILE_IDS = {"NUL": "id\x00x", "bidi override": "id\u202etxt.exe", "bell": "id\x07", "newline": "id\nx",
               "zero width": "id\u200bx", "too long": "x" * 300}


@pytest.fixture(scope="module")
def engine_api(lethe_engine):
    with running_api(lethe_engine.settings, lethe_engine) as running:
        yield running


@pytest.mark.parametrize("case", sorted(HOSTILE_IDS))
def test_one_id_rule_for_every_id_of_every_call(engine_api, case):
    value = HOSTILE_IDS[case]
    stub = engine_api.stub
    calls = {
        "request_id": (stub.SubmitErasure, service_pb2.SubmitErasureRequest(
            erasure=types_pb2.Erasure(request_id=value, subject_ids=["s"]))),
        "subject_ids[0]": (stub.SubmitErasure, service_pb2.SubmitErasureRequest(
            erasure=types_pb2.Erasure(request_id="hostile-1", subject_ids=[value]))),
        "record_ids[0]": (stub.SubmitErasure, service_pb2.SubmitErasureRequest(
            erasure=types_pb2.Erasure(request_id="hostile-2", record_ids=[value]))),
        "model_names[0]": (stub.SubmitErasure, service_pb2.SubmitErasureRequest(
            erasure=types_pb2.Erasure(request_id="hostile-3", subject_ids=["s"], model_names=[value]))),
        "job_id": (stub.GetJob, service_pb2.GetJobRequest(job_id=value)),
        "job_id ": (stub.WatchJob, service_pb2.WatchJobRequest(job_id=value)),
        "request_id ": (stub.GetCertificate, service_pb2.GetCertificateRequest(request_id=value)),
    }
    for field, (call, request) in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            result = call(request, timeout=10)
            list(result) if hasattr(result, "__next__") else None
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, refused.value.details())
        assert field.strip() in dict(field_violations(refused.value))
        assert value not in refused.value.details()
    resumed = list(stub.Session(iter([service_pb2.SessionRequest(resume=service_pb2.Resume(request_ids=[value]))]),
                                timeout=10))
    assert resumed[0].rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_huge_ids_are_never_echoed(engine_api):
    huge = "j" * 1_000_000
    for call, request in ((engine_api.stub.GetJob, service_pb2.GetJobRequest(job_id=huge)),
                          (engine_api.stub.GetCertificate, service_pb2.GetCertificateRequest(request_id=huge))):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers = sum(len(key) + len(value) for key, value in refused.value.trailing_metadata())
        assert trailers < 2000 and "j" * 50 not in refused.value.details()
    with pytest.raises(grpc.RpcError) as unknown:  # a valid id that is unknown is quoted in part only
        engine_api.stub.GetJob(service_pb2.GetJobRequest(job_id="k" * 250), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "k" * 41 not in unknown.value.details()


@pytest.mark.parametrize("uri", ["/etc/passwd", "/etc/no-such-file.parquet", "file:///etc/passwd",
                                 "../../etc/passwd", "s3://other-bucket/data.parquet", "http://169.254.169.254/x",
                                 "relative/path.parquet"])
def test_dataset_uris_outside_the_roots_are_refused_with_one_answer(engine_api, lethe_engine, uri):
    request = service_pb2.RegisterModelRequest(model_name="digits-cnn", version="1", dataset_uri=uri,
                                               task_type=types_pb2.TASK_TYPE_CLASSIFICATION, num_classes=10)
    with pytest.raises(grpc.RpcError) as refused:
        engine_api.stub.RegisterModel(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(refused.value)
    assert violation[0] == "dataset_uri" and "not inside a dataset root" in violation[1]
    text = refused.value.details() + violation[1]
    assert "passwd" not in text and "Parquet magic" not in text and "no-such-file" not in text


def test_dataset_refusals_inside_a_root_say_nothing_about_the_file(engine_api, lethe_engine, tmp_path):
    root = Path(lethe_engine.settings.dataset_roots[0])
    outside = tmp_path.parent.parent / "outside-secret.txt"  # the link target lies outside every root
    link = tmp_path / "link.parquet"
    link.symlink_to("/etc/passwd")
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("secret notes")
    assert tmp_path.is_relative_to(root) and not outside.is_relative_to(root)
    answers = set()
    for path in (link, not_parquet, tmp_path / "missing.parquet"):
        # The serving alias, not version 1: earlier tests on this worker's shared engine may have erased from
        # version 1, and a lineage refusal would come before the dataset's.
        request = service_pb2.RegisterModelRequest(model_name="digits-cnn", alias=lethe_engine.settings.serving_alias,
                                                   dataset_uri=str(path),
                                                   task_type=types_pb2.TASK_TYPE_CLASSIFICATION, num_classes=10)
        with pytest.raises(grpc.RpcError) as refused:
            engine_api.stub.RegisterModel(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (violation,) = field_violations(refused.value)
        answers.add((path == link, violation[1]))
        assert str(path) not in refused.value.details() + violation[1] and "magic" not in violation[1]
    assert {text for _, text in answers} == {
        "dataset_uri is not inside a dataset root this server accepts (LETHE_DATASET_ROOTS; <state_dir>/incoming "
        "is always accepted)",
        "no readable Parquet dataset at dataset_uri (missing, unreadable or not Parquet)"}
