"""Updates and rectifications through the real gRPC server (issue 13): an update of new digits records on
the Session stream (ack, progress, verified certificate), and a rectification of a fictitious person's
birthplace on the tiny GPT through the unary RPC (the corrected answer learned, the old one forgotten and
tombstoned). Its own engine: rectifications tombstone records that other modules register.
"""

from __future__ import annotations

import json
import time

import grpc
import pandas as pd
import pytest
from google.protobuf import struct_pb2

from lethe_demo.data import (
    LM_RECTIFY_STRATEGY,
    birthplace_record,
    build_tiny_lm,
    corrected_birthplace,
    shifted_digits,
)
from service import store as db
from service.api.pb import service_pb2, types_pb2
from tests.service.api_fixtures import running_api
from tests.service.conftest import make_engine

# Its own engine, the tiny GPT and a server (a minute or more): make test-all. make test covers the same paths
# through the engine (tests/service/test_engine_updates.py) and the API's refusals (test_api_service.py).
pytestmark = pytest.mark.long

JOB_TIMEOUT_S = 600
TERMINAL = types_pb2.EVENT_KIND_TERMINAL
SUCCEEDED = types_pb2.JOB_STATE_SUCCEEDED


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine, digits = make_engine(tmp_path_factory.mktemp("api-updates") / "state")
    lm = build_tiny_lm(engine.settings, engine)
    with running_api(engine.settings, engine) as api:
        yield api, engine, digits, lm
    engine.stop(30)
    engine.store.dispose()


def _record(record_id: str, subject_id: str, **columns) -> types_pb2.Record:
    record = types_pb2.Record(record_id=record_id, subject_id=subject_id)
    record.columns.update(columns)
    return record


def _certificate(api, request_id: str) -> dict:
    response = api.stub.GetCertificate(service_pb2.GetCertificateRequest(request_id=request_id))
    return json.loads(response.certificates[0].body_json)


def _wait_terminal(engine, job_id: str):
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = engine.get_job(job_id)
        if job.state.terminal:
            return job
        time.sleep(0.5)
    raise TimeoutError(job_id)


@pytest.mark.slow
def test_an_update_on_the_session_stream_is_acked_progresses_and_is_certified(served):
    api, engine, digits, _ = served
    records = [_record(r["record_id"], r["subject_id"], features=r["features"], label=r["label"])
               for r in shifted_digits(40, "api-new")]
    update = types_pb2.Update(request_id="api-update-1", model_name=digits, records=records)
    responses = list(api.stub.Session(iter([service_pb2.SessionRequest(update=update)]), timeout=JOB_TIMEOUT_S))
    kinds = [r.WhichOneof("message") for r in responses]
    assert kinds[0] == "accepted" and responses[0].accepted.request_id == "api-update-1"
    events = [r.event for r in responses if r.WhichOneof("message") == "event"]
    assert any(e.kind == types_pb2.EVENT_KIND_PROGRESS for e in events)
    assert events[-1].kind == TERMINAL and events[-1].state == SUCCEEDED, events[-1].message
    (certificate,) = events[-1].certificates
    body = json.loads(certificate.body_json)
    assert body["label"] == "update" and body["update"]["records_learned"] == 40
    assert body["verification"]["passed"] is True
    check = api.stub.VerifyCertificate(service_pb2.VerifyCertificateRequest(certificate=certificate))
    assert check.valid


@pytest.mark.slow
def test_a_rectified_birthplace_is_learned_and_the_old_one_forgotten(served):
    api, engine, _, lm = served
    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, lm, db.get_model(conn, lm).serving_version)
    frame: pd.DataFrame = engine.catalog.frame(dataset.path)
    person = "person-03"  # the demo's rectified person (lethe_demo.demo.LM_RECTIFIED_PERSON)
    birthplace = birthplace_record(frame, person)
    old_answer = str(birthplace["answer"])
    new_answer = corrected_birthplace(old_answer, "Valparaiso")
    assert new_answer != old_answer and "Valparaiso" in new_answer
    rectification = types_pb2.Rectification(
        request_id="api-rectify-1", subject_id=person, model_names=[lm], strategy=LM_RECTIFY_STRATEGY[0],
        corrected_records=[_record(str(birthplace["record_id"]), person, prompt=str(birthplace["prompt"]),
                                   answer=new_answer)])
    rectification.strategy_params.update(LM_RECTIFY_STRATEGY[1])
    accepted = api.stub.SubmitRectification(service_pb2.SubmitRectificationRequest(rectification=rectification))
    assert accepted.accepted.request_id == "api-rectify-1"
    job = _wait_terminal(engine, accepted.accepted.job_ids[0])
    state = api.stub.GetRequest(service_pb2.GetRequestRequest(request_id="api-rectify-1")).request.state
    with engine.store.read() as conn:
        evidence = db.get_job(conn, job.job_id).evidence
    assert "verification" in evidence and "checks" in evidence["verification"], (job.state, job.message, [
        [(c["name"], c["value"], c["limit"]) for c in a.get("verification", {}).get("checks", [])] for a in evidence.get("attempts", [])])
    checks = {c["name"]: c for c in evidence["verification"]["checks"]}
    assert state == types_pb2.REQUEST_STATE_COMPLETED, (job.message, {k: (c["value"], c["limit"], c["passed"])
                                                                       for k, c in checks.items()})
    body = _certificate(api, "api-rectify-1")
    assert body["label"] == "rectification" and body["dataset"]["tombstones_added"] == 1
    assert checks["learned"]["passed"] and checks["learned"]["value"] == 1.0  # the corrected answer, exactly
    assert checks["rectified_membership_ks"]["passed"] and checks["rectified_membership_auc"]["passed"]
    with engine.store.read() as conn:
        after = db.dataset_for_model_version(conn, lm, job.result_version)
    data = engine.catalog.frame(after.path)
    assert str(birthplace["record_id"]) not in set(data["record_id"])
    assert (data["answer"] == new_answer).sum() == 1 and old_answer not in set(data.loc[
        data["subject_id"] == person, "answer"])

    # The old value is tombstoned: sending it again as an update is refused, nothing stored.
    again = types_pb2.Update(request_id="api-rectify-back", model_name=lm, records=[_record(
        str(birthplace["record_id"]), "someone-else", prompt=str(birthplace["prompt"]), answer=old_answer)])
    with pytest.raises(grpc.RpcError) as refused:
        api.stub.SubmitUpdate(service_pb2.SubmitUpdateRequest(update=again))
    assert refused.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert str(birthplace["record_id"]) not in refused.value.details()


def test_struct_columns_round_trip():  # the inline columns travel as a Struct: numbers as doubles
    columns = struct_pb2.Struct()
    columns.update({"features": [0.5, 1.0], "label": 3})
    assert list(columns["features"]) == [0.5, 1.0] and columns["label"] == 3.0
