"""The Session and WatchJob stream protocol, through a real gRPC server and the generated stub, over a
scripted in-memory engine: acks before events, seq order, resume after a broken stream, replay of a
settled request, per-message refusals that keep the stream open. Job timing is driven by the test, so
these run in well under a second each; the same paths are exercised end to end in test_api_service.py."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.pb import SERVICE_NAME, service_pb2, types_pb2
from service.settings import RESERVED_GRPC_WORKERS, Settings, stream_budgets
from tests.service.api_fixtures import ScriptedEngine, running_api

TERMINAL = types_pb2.EVENT_KIND_TERMINAL


@pytest.fixture
def scripted(tmp_path):
    engine = ScriptedEngine()
    with running_api(Settings(state_dir=tmp_path), engine) as api:
        yield engine, api


def _erasure(request_id: str, *subjects: str) -> service_pb2.SessionRequest:
    return service_pb2.SessionRequest(erasure=types_pb2.Erasure(request_id=request_id,
                                                                subject_ids=list(subjects) or ["s"]))


def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def _drive(engine: ScriptedEngine, request_ids: list[str]) -> threading.Thread:
    """Once every request is submitted, run each job through two stages and succeed it."""

    def run():
        _wait_for(lambda: all(rid in engine._requests for rid in request_ids))
        for request_id in request_ids:
            job_id = engine.job_of(request_id)
            engine.progress(job_id, "apply", 0.3)
            engine.progress(job_id, "verify", 0.7)
            engine.succeed(job_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _kinds(responses):
    return [response.WhichOneof("message") for response in responses]


def test_acks_precede_events_events_in_seq_order_and_stream_ends_when_settled(scripted):
    engine, api = scripted
    request_ids = ["r1", "r2", "r3"]
    driver = _drive(engine, request_ids)
    responses = list(api.stub.Session(iter([_erasure(rid) for rid in request_ids]), timeout=10))
    driver.join(5)

    acked: set[str] = set()
    seqs = []
    for response in responses:
        if response.WhichOneof("message") == "accepted":
            assert response.accepted.created and response.accepted.job_ids
            acked.add(response.accepted.request_id)
        else:
            event = response.event
            assert set(event.request_ids) <= acked, "an event arrived before its request's ack"
            seqs.append(event.seq)
    assert acked == set(request_ids)
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    terminals = [r.event for r in responses if r.WhichOneof("message") == "event" and r.event.kind == TERMINAL]
    assert {t.request_ids[0] for t in terminals} == set(request_ids)
    for terminal in terminals:
        assert terminal.state == types_pb2.JOB_STATE_SUCCEEDED
        assert [c.request_id for c in terminal.certificates] == list(terminal.request_ids)


def test_resume_after_a_broken_stream_loses_and_repeats_nothing(scripted):
    engine, api = scripted
    seen = []
    call = api.stub.Session(iter([_erasure("r1")]), timeout=10)
    for response in call:
        if response.WhichOneof("message") == "event":
            seen.append(response.event.seq)
            break  # the ACCEPTED event: the connection "breaks" here
    call.cancel()
    job_id = engine.job_of("r1")
    for stage, fraction in (("resolve", 0.05), ("apply", 0.5), ("verify", 0.8)):
        engine.progress(job_id, stage, fraction)
    engine.succeed(job_id)

    resume = service_pb2.SessionRequest(resume=service_pb2.Resume(after_seq=seen[-1], request_ids=["r1"]))
    responses = list(api.stub.Session(iter([resume]), timeout=10))
    assert _kinds(responses) == ["event"] * 4
    events = [response.event for response in responses]
    assert [e.seq for e in events] == [seen[-1] + 1, seen[-1] + 2, seen[-1] + 3, seen[-1] + 4]
    assert [e.stage for e in events[:3]] == ["resolve", "apply", "verify"]
    assert events[-1].kind == TERMINAL and events[-1].certificates[0].request_id == "r1"


def test_a_resume_beyond_the_newest_event_is_clamped_and_later_events_still_arrive(scripted):
    """An outside client sent Resume(after_seq far in the future) and then a real erasure on the same stream:
    the erasure's TERMINAL event never came. The cursor is now clamped to the newest event."""
    engine, api = scripted
    driver = _drive(engine, ["settled"])
    list(api.stub.Session(iter([_erasure("settled")]), timeout=10))
    driver.join(5)
    future = service_pb2.SessionRequest(resume=service_pb2.Resume(after_seq=10**9, request_ids=["settled"]))
    driver = _drive(engine, ["later"])
    responses = list(api.stub.Session(iter([future, _erasure("later")]), timeout=10))
    driver.join(5)
    events = [r.event for r in responses if r.WhichOneof("message") == "event"]
    terminal = [e for e in events if e.kind == TERMINAL and list(e.request_ids) == ["later"]]
    assert terminal and terminal[0].certificates[0].request_id == "later"
    assert not [e for e in events if "settled" in e.request_ids]  # nothing of "settled" is newer than newest


def test_idempotent_replay_of_a_settled_request_replays_its_history(scripted):
    engine, api = scripted
    driver = _drive(engine, ["r1"])
    first = list(api.stub.Session(iter([_erasure("r1")]), timeout=10))
    driver.join(5)
    second = list(api.stub.Session(iter([_erasure("r1")]), timeout=10))
    assert engine.submit_calls == 2
    assert second[0].accepted.created is False
    assert second[0].accepted.job_ids == first[0].accepted.job_ids
    assert [r.event.seq for r in second[1:]] == [r.event.seq for r in first if r.WhichOneof("message") == "event"]


def test_refused_submissions_keep_the_stream_open(scripted):
    engine, api = scripted
    driver = _drive(engine, ["good"])
    messages = [
        _erasure(""),  # refused by the engine: INVALID_ARGUMENT with a field violation
        service_pb2.SessionRequest(rectification=types_pb2.Rectification(request_id="fix-1", subject_id="s")),
        service_pb2.SessionRequest(update=types_pb2.Update(request_id="upd-1", model_name="digits")),
        service_pb2.SessionRequest(),  # no message at all
        _erasure("good"),
    ]
    responses = list(api.stub.Session(iter(messages), timeout=10))
    driver.join(5)
    rejected = [r.rejected for r in responses if r.WhichOneof("message") == "rejected"]
    assert [(r.request_id, grpc.StatusCode(_code(r.code))) for r in rejected] == [
        ("", grpc.StatusCode.INVALID_ARGUMENT), ("fix-1", grpc.StatusCode.INVALID_ARGUMENT),
        ("upd-1", grpc.StatusCode.INVALID_ARGUMENT), ("", grpc.StatusCode.INVALID_ARGUMENT)]
    assert [(v.field, v.description) for v in rejected[0].field_violations] == [
        ("request_id", "must not be empty")]
    assert [v.field for v in rejected[1].field_violations] == ["corrected_records"]
    assert [v.field for v in rejected[2].field_violations] == ["records"]
    assert any(r.WhichOneof("message") == "accepted" and r.accepted.request_id == "good" for r in responses)
    assert responses[-1].event.kind == TERMINAL


def test_rejected_job_settles_every_coalesced_request_without_certificate(scripted):
    engine, api = scripted

    def reject_when_submitted():
        _wait_for(lambda: "bad" in engine._requests)
        engine.reject(engine.job_of("bad"))

    threading.Thread(target=reject_when_submitted, daemon=True).start()
    responses = list(api.stub.Session(iter([_erasure("bad")]), timeout=10))
    terminal = responses[-1].event
    assert terminal.kind == TERMINAL and terminal.state == types_pb2.JOB_STATE_REJECTED_BY_VERIFICATION
    assert not terminal.certificates


def test_all_requests_feed_sees_other_clients_requests(scripted):
    engine, api = scripted
    feed = api.stub.Session(iter([service_pb2.SessionRequest(resume=service_pb2.Resume(all_requests=True))]),
                            timeout=10)
    api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=types_pb2.Erasure(request_id="x",
                                                                                      subject_ids=["s"])))
    engine.succeed(engine.job_of("x"))
    kinds = [(r.event.request_ids[0], r.event.kind) for r in feed]
    assert kinds == [("x", types_pb2.EVENT_KIND_ACCEPTED), ("x", TERMINAL)]


def test_watch_job_resumes_by_seq_and_ends_after_terminal(scripted):
    engine, api = scripted
    accepted = api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(
        erasure=types_pb2.Erasure(request_id="w", subject_ids=["s"]))).accepted
    job_id = accepted.job_ids[0]
    middle = engine.progress(job_id, "apply", 0.5)
    engine.succeed(job_id)
    events = [r.event for r in api.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id, after_seq=middle),
                                                 timeout=10)]
    assert [e.kind for e in events] == [TERMINAL] and events[0].seq > middle
    with pytest.raises(grpc.RpcError) as unknown:
        list(api.stub.WatchJob(service_pb2.WatchJobRequest(job_id="nope"), timeout=10))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def _code(value: int) -> tuple:
    return next(code.value for code in grpc.StatusCode if code.value[0] == value)


def test_resuming_an_unknown_request_is_refused_and_the_stream_ends(scripted):
    _, api = scripted
    resume = service_pb2.SessionRequest(resume=service_pb2.Resume(after_seq=0, request_ids=["never-sent"]))
    responses = list(api.stub.Session(iter([resume]), timeout=10))
    assert _kinds(responses) == ["rejected"]
    assert grpc.StatusCode(_code(responses[0].rejected.code)) == grpc.StatusCode.NOT_FOUND
    assert responses[0].rejected.field_violations[0].field == "resume.request_ids"


def test_streams_beyond_the_worker_cap_are_refused_and_health_checks_still_answer(tmp_path):
    """With LETHE_GRPC_MAX_WORKERS = reserve + 2, one Session fills the Session budget and one WatchJob the
    other: a second Session and a second WatchJob each get RESOURCE_EXHAUSTED at once (not queued), while
    the open Session does not keep a new client's WatchJob or reflection query out (separate budgets), and
    health checks and unary calls, fired concurrently, still find the reserved threads. Closing a stream
    gives its slot back."""
    engine = ScriptedEngine()
    settings = Settings(state_dir=tmp_path, grpc_max_workers=RESERVED_GRPC_WORKERS + 2)
    assert stream_budgets(settings.grpc_max_workers) == (1, 1)
    with running_api(settings, engine) as api:
        release = threading.Event()

        def held_requests():
            yield _erasure("held")
            release.wait(15)

        held = api.stub.Session(held_requests(), timeout=20)
        assert next(held).WhichOneof("message") == "accepted"  # the stream is open and holds its thread
        job_id = engine.job_of("held")

        with pytest.raises(grpc.RpcError) as refused:
            next(api.stub.Session(iter([_erasure("second")]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Session streams" in refused.value.details()

        # Sessions at their cap: a new client's reflection query and WatchJob still get through.
        reflection = reflection_pb2_grpc.ServerReflectionStub(api.client.channel)
        (listed,) = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5))
        assert SERVICE_NAME in {s.name for s in listed.list_services_response.service}
        opened: list = []

        def watch_opened() -> bool:  # the reflection stream's slot is given back as its handler unwinds
            try:
                watch = api.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=20)
                opened.append((watch, next(watch)))
                return True
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False

        _wait_for(watch_opened)
        watch, first = opened[-1]
        assert first.event.job_id == job_id  # open: it holds the one other-stream slot
        with pytest.raises(grpc.RpcError) as second_watch:
            next(api.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=5))
        assert second_watch.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        health = health_pb2_grpc.HealthStub(api.client.channel)
        answers: list = []

        def probe():
            answers.append(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            answers.append(api.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), timeout=5).job.job_id)

        probes = [threading.Thread(target=probe) for _ in range(2 * RESERVED_GRPC_WORKERS)]
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join(10)
        assert answers.count(health_pb2.HealthCheckResponse.SERVING) == 2 * RESERVED_GRPC_WORKERS
        assert answers.count(job_id) == 2 * RESERVED_GRPC_WORKERS

        release.set()
        engine.succeed(job_id)
        assert list(held)[-1].event.kind == TERMINAL  # the session ends once its request is settled
        list(watch)  # the watch ends after the TERMINAL event

        def watch_opens() -> bool:
            try:
                return bool(list(api.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=5)))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False  # the server side of the first stream is still unwinding

        _wait_for(watch_opens)
