"""Operator controls (issue 10): a rejected request stays pending until a retry certifies it or an operator
closes it; a request that has not run can be cancelled; each is audited; the CLI prints names and reasons."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import pytest

from lethe_demo.data import DEMO_POLICY, build_digits_demo
from service import store as db
from service.api.pb import service_pb2, types_pb2
from service.audit import verify_chain
from service.cli import main
from service.domain import (
    ErasureRequest,
    FailedPrecondition,
    InvalidArgument,
    JobState,
    MethodStep,
    RequestState,
    RetryRequest,
)
from service.engine import Engine
from tests.service.api_fixtures import running_api
from tests.service.conftest import make_settings, wait_for_jobs

COLLAPSE = MethodStep("ssd", {"alpha": 1e-6, "lam": 1e-6})  # dampens nearly every weight: the gate rejects it


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    state = tmp_path_factory.mktemp("controls")
    engine = Engine(make_settings(state, coalescing_window_s=0.0))
    model = build_digits_demo(engine.settings, engine, model_name="digits-controls",
                              policy=replace(DEMO_POLICY, method_chain=(COLLAPSE,)))
    engine.start()
    with running_api(engine.settings, engine) as api:
        yield engine, model, api
    engine.stop(10)
    engine.store.dispose()


def _rejected(engine, model, request_id, subject):
    outcome = engine.submit_erasure(ErasureRequest(request_id=request_id, subject_ids=(subject,), model_names=(model,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
    assert job.state is JobState.REJECTED_BY_VERIFICATION, job.message
    return job


@pytest.mark.slow
def test_a_rejected_request_is_retried_with_another_method_as_attempt_two(controlled, capsys):
    engine, model, api = controlled
    job = _rejected(engine, model, "ctl-retry", "subject-0007")
    view = engine.get_request("ctl-retry")
    assert view.state is RequestState.PENDING and view.attempts == 1 and view.job_ids == (job.job_id,)
    assert "ctl-retry" in {p.request_id for p in engine.pending_requests()}  # the clock still runs

    # `lethe job` says why, by name, with the failing check's value and limit.
    target = ["--target", api.client.target]
    assert main(["job", job.job_id, *target]) == 0
    shown = capsys.readouterr().out
    assert "REJECTED_BY_VERIFICATION" in shown and "FAILED utility" in shown and "attempt 1: ssd" in shown

    with pytest.raises(FailedPrecondition):  # it already ran: cancel is the wrong tool
        engine.cancel_request("ctl-retry", "")
    with pytest.raises(InvalidArgument) as looser:  # a retry may only make the gate stricter
        engine.retry_request(RetryRequest("ctl-retry", 2, "ssd-auto", {}, {"max_utility_drop": 0.1}))
    assert looser.value.violations[0].field == "policy_overrides.max_utility_drop"

    assert main(["retry", "ctl-retry", "--method", "ssd-auto", "--expected-attempt", "2", *target]) == 0
    assert "attempt 2 of ctl-retry: new job(s)" in capsys.readouterr().out
    again = engine.retry_request(RetryRequest("ctl-retry", expected_attempt=2, method="ssd-auto"))
    assert not again.created and again.attempt == 2  # the same call twice creates one attempt
    (second,) = wait_for_jobs(engine, again.job_ids, timeout_s=600)
    assert second.state is JobState.SUCCEEDED, second.message
    view = engine.get_request("ctl-retry")
    assert view.state is RequestState.COMPLETED and view.attempts == 2 and view.certified_models == (model,)
    assert "ctl-retry" not in {p.request_id for p in engine.pending_requests()}
    body = json.loads(engine.get_certificate("ctl-retry")[0].body_json)
    assert body["method"]["name"] == "ssd-auto" and body["job_id"] == second.job_id


@pytest.mark.slow
def test_close_needs_a_reason_stops_the_clock_and_is_audited(controlled, capsys):
    engine, model, api = controlled
    _rejected(engine, model, "ctl-close", "subject-0010")
    with pytest.raises(InvalidArgument) as no_reason:
        engine.close_request("ctl-close", "  ")
    assert no_reason.value.violations[0].field == "reason"
    assert main(["close", "ctl-close", "--reason", "handled by a manual retrain", "--target",
                 api.client.target]) == 0
    assert "CLOSED" in capsys.readouterr().out
    view = engine.get_request("ctl-close")
    assert view.state is RequestState.CLOSED and view.state_reason == "handled by a manual retrain"
    assert "ctl-close" not in {p.request_id for p in engine.pending_requests()}
    with engine.store.read() as conn:
        kinds = [json.loads(row.body_json) for row in db.audit_entries(conn)]
        assert {"kind": "request_closed", "request_id": "ctl-close"}.items() <= next(
            k for k in kinds if k["kind"] == "request_closed").items()
        assert verify_chain(conn, engine.settings.audit_key_bytes).valid
    with pytest.raises(FailedPrecondition):  # a closed request is not retried
        engine.retry_request(RetryRequest("ctl-close"))


@pytest.mark.slow
def test_a_queued_request_is_cancelled_and_its_job_with_it(tmp_path):
    engine = Engine(make_settings(tmp_path, coalescing_window_s=3600.0))  # the job waits in its window
    model = build_digits_demo(engine.settings, engine)
    engine.start()
    try:
        outcome = engine.submit_erasure(ErasureRequest(request_id="ctl-cancel", subject_ids=("subject-0013",),
                                                       model_names=(model,)))
        view = engine.cancel_request("ctl-cancel", "submitted by mistake")
        assert view.state is RequestState.CANCELLED
        assert engine.get_job(outcome.job_ids[0]).state is JobState.CANCELLED
        assert engine.pending_requests() == []
        events = engine.events(request_ids=("ctl-cancel",))
        assert events[-1].kind.value == "TERMINAL" and "cancelled" in events[-1].message
        with pytest.raises(FailedPrecondition):
            engine.cancel_request("ctl-cancel", "")
        time.sleep(0.5)
        assert engine.get_job(outcome.job_ids[0]).state is JobState.CANCELLED  # never claimed
    finally:
        engine.stop(10)
        engine.store.dispose()


def test_the_cli_names_status_codes(controlled, capsys):
    engine, model, api = controlled
    with pytest.raises(grpc.RpcError) as unknown:
        api.stub.GetRequest(service_pb2.GetRequestRequest(request_id="no-such-request"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert main(["request", "no-such-request", "--target", api.client.target]) != 0
    assert "NOT_FOUND" in capsys.readouterr().err
    assert types_pb2.RequestState.Name(types_pb2.REQUEST_STATE_CLOSED) == "REQUEST_STATE_CLOSED"
