"""The policy's ``reerase_after_update`` (service.updates): after an update that passed its gate, every earlier
erasure of the lineage is erased again from its sealed set, even when its re-check passed; a lineage with
nothing erased re-erases nothing; without the policy only a failed re-check triggers it. Unset at registration,
the policy takes the task's default: on for causal LMs, off for classifiers.

Its own engine and model (registered before any erasure: erasures tombstone the digits records that a later
registration of the same data would be refused for).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from lethe_demo.data import DEMO_POLICY, build_digits_demo, digits_frame
from service import store as db
from service.domain import ErasureRequest, JobState, UpdateSubmission
from service.updates import reerase_trigger
from tests.service.conftest import make_engine, wait_for_jobs
from tests.service.test_engine_updates import shifted

MODEL = "digits-reerase"


@pytest.fixture(scope="module")
def lethe_engine(tmp_path_factory):
    engine, _ = make_engine(tmp_path_factory.mktemp("reerase") / "state")
    build_digits_demo(engine.settings, engine, model_name=MODEL,
                      policy=replace(DEMO_POLICY, reerase_after_update=True))
    yield engine
    engine.stop(30)
    engine.store.dispose()


def _update(engine, request_id: str, records) -> dict:
    outcome = engine.submit_update(UpdateSubmission(request_id, MODEL, records=records))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message
    with engine.store.read() as conn:
        return db.get_job(conn, job.job_id).evidence


def test_the_trigger_is_a_failed_recheck_or_the_policy_never_another_failure():
    recheck = "erased_stays_erased[req-1]"
    assert reerase_trigger((recheck,), False) == "regression"
    assert reerase_trigger((recheck,), True) == "regression"
    assert reerase_trigger((), True) == "policy"
    assert reerase_trigger((), False) is None
    assert reerase_trigger(("utility", recheck), True) is None  # refused anyway: a re-erasure cannot repair it
    assert reerase_trigger(("learned",), False) is None


@pytest.mark.slow
def test_every_earlier_erasure_is_erased_again_after_an_update(lethe_engine):
    engine, frame = lethe_engine, digits_frame()
    with engine.store.read() as conn:
        assert db.get_model(conn, MODEL).policy["reerase_after_update"] is True

    # Nothing erased yet: the policy has nothing to re-erase, and says nothing.
    evidence = _update(engine, "reerase-update-1", shifted(frame, 20, "ra", start=100))
    assert evidence["update"]["escalation"] is None

    subjects = tuple(sorted(frame[frame["split"] == "train"]["subject_id"].unique()))[:3]
    erased = engine.submit_erasure(ErasureRequest("reerase-subjects", subject_ids=subjects, model_names=(MODEL,)))
    (job,) = wait_for_jobs(engine, erased.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message

    evidence = _update(engine, "reerase-update-2", shifted(frame, 20, "rb", start=200))
    escalation = evidence["update"]["escalation"]
    assert escalation["trigger"] == "policy"
    assert escalation["first_gate"]["passed"] is True  # the re-check held: the policy, not a regression
    assert escalation["method"]["sets"] == ["reerase-subjects"]
    (group,) = escalation["method"]["groups"]
    assert group["sets"] == ["reerase-subjects"] and group["attempts"], "the lineage's chain ran on the sealed set"
    assert escalation["method"]["chain"] and "retrain" not in escalation["method"]["chain"]
    assert evidence["verification"]["policy"]["reerase_after_update"] is True  # the evidence says which rule ran
    final = {c["name"]: c for c in evidence["verification"]["checks"]}
    assert final["erased_stays_erased[reerase-subjects]"]["passed"] is True
    if escalation["repaired"]:
        assert "reverted_because" not in escalation
    else:  # no method passed, or the re-erased model failed the update gate: the passing update stands
        assert group["method"] is None or escalation["reverted_because"]


def test_the_policy_travels_through_the_proto_and_unset_means_the_tasks_default():
    from service.api import converters
    from service.api.pb import types_pb2
    from service.domain import RegisteredModel, TaskType, VerificationPolicy

    assert VerificationPolicy().reerase_after_update is None
    assert converters.policy_from_proto(types_pb2.VerificationPolicy()).reerase_after_update is None
    for value in (True, False):
        policy = converters.policy_from_proto(types_pb2.VerificationPolicy(reerase_after_update=value))
        assert policy.reerase_after_update is value
        registered = RegisteredModel(model_name="m", version="1", serving_alias="serving",
                                     task_type=TaskType.CLASSIFICATION, dataset_digest="d", records=1, policy=policy)
        message = converters.registered_model_to_proto(registered).policy
        assert message.HasField("reerase_after_update") and message.reerase_after_update is value


def test_registration_fills_in_the_tasks_default_and_keeps_an_explicit_choice():
    from service.domain import ModelRegistration, TaskType, VerificationPolicy
    from service.registration import _with_default_reerase

    def registration(task_type, policy):
        return ModelRegistration(model_name="m", version="1", alias=None, task_type=task_type,
                                 dataset_uri="/tmp/d.parquet", policy=policy)

    unset = VerificationPolicy()
    # causal LMs re-erase after every update unless the owner says otherwise; classifiers do not
    assert _with_default_reerase(unset, registration(TaskType.CAUSAL_LM, unset)).reerase_after_update is True
    assert _with_default_reerase(unset, registration(TaskType.CLASSIFICATION, unset)).reerase_after_update is False
    for value in (True, False):
        chosen = VerificationPolicy(reerase_after_update=value)
        for task_type in TaskType:
            assert _with_default_reerase(chosen, registration(task_type, chosen)).reerase_after_update is value
            assert chosen.reerases_after_update(task_type) is value
    # a policy that did not come through registration: the update job applies the same default
    assert unset.reerases_after_update(TaskType.CAUSAL_LM) is True
    assert unset.reerases_after_update(TaskType.CLASSIFICATION) is False


def test_the_cli_flag_sets_the_policy():
    from service import cli

    base = ["register", "--model", "m", "--version", "1", "--task", "classification", "--dataset", "/tmp/d.parquet",
            "--num-classes", "10"]
    assert cli._parser().parse_args([*base, "--reerase-after-update"]).reerase_after_update is True
    assert cli._parser().parse_args([*base, "--no-reerase-after-update"]).reerase_after_update is False
    assert cli._parser().parse_args(base).reerase_after_update is None  # unset: the task's default
