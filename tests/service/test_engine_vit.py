"""Class erasure on the digits ViT through the engine (issue 6, "Service"): the policy's default method is
GS-LoRA++, consecutive class erasures on one model are consecutive tasks (the second job's method is told
every class erased so far; the version tag ``lethe.erased_classes`` accumulates), and the certificate carries
Acc_f, Acc_o, utility on the remaining classes and ONNX parity of the merged ViT.

The ViT gets its own engine and state directory (session-scoped here), so the shared digits CNN is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd
import pytest

from service import store as db
from lethe_demo.data import VIT_MODEL, VIT_POLICY, build_digits_vit
from service.domain import ErasureRequest, JobFilter, JobState
from service.engine import Engine
from tests.service.conftest import make_settings, wait_for_jobs


@pytest.fixture(scope="session")
def vit_engine(tmp_path_factory) -> Iterator[Engine]:
    settings = make_settings(tmp_path_factory.mktemp("lethe-vit-state"))
    engine = Engine(settings)
    build_digits_vit(settings, engine)
    engine.start()
    yield engine
    engine.stop(30)
    engine.store.dispose()


def _erase(engine: Engine, request_id: str, classes: tuple[int, ...]):
    outcome = engine.submit_erasure(ErasureRequest(request_id=request_id, classes=classes, model_names=(VIT_MODEL,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=180)
    assert job.state is JobState.SUCCEEDED, (job.message, json.dumps(job.evidence, default=str)[:3000])
    (certificate,) = engine.get_certificate(request_id)
    assert engine.verify_certificate(certificate.body_json, certificate.signature).valid
    return job, json.loads(certificate.body_json)


def _checks(body: dict) -> dict[str, dict]:
    return {c["name"]: c for c in body["verification"]["checks"]}


def test_consecutive_class_erasures_on_the_vit_are_continual_tasks(vit_engine):
    engine = vit_engine
    registered = engine.registry.serving_version(VIT_MODEL)
    assert engine.registry.erased_classes(VIT_MODEL, registered) == ()

    # Task 1: classes 1 and 2, by the policy's default method.
    first, body1 = _erase(engine, "vit-class-1-2", (1, 2))
    assert first.method == VIT_POLICY.default_method == "gslora++"
    assert body1["method"]["name"] == "gslora++" and body1["label"] == "approximate"
    assert body1["method"]["details"]["forgotten_classes"] == [1, 2]
    assert body1["method"]["details"]["retain_dropped"] == 0  # the forget set holds every train record of 1, 2
    version1 = engine.registry.resolve(VIT_MODEL, first.result_version)
    assert json.loads(version1.tags["lethe.erased_classes"]) == [1, 2]
    assert version1.tags["lethe.parent_version"] == registered
    continual1 = body1["verification"]["continual"]
    assert continual1["task_classes"] == [1, 2] and continual1["earlier_classes"] == []
    assert continual1["acc_f"] <= VIT_POLICY.class_forget_max_accuracy
    assert continual1["acc_o"] is None and continual1["acc_o_records"] == 0

    # The purge removed every record of classes 1 and 2, so they cannot re-enter retain data.
    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, VIT_MODEL, first.result_version)
    assert not pd.read_parquet(dataset.path)["label"].isin([1, 2]).any()

    # Task 2: class 5 on the version task 1 registered; the method is told all three classes.
    second, body2 = _erase(engine, "vit-class-5", (5,))
    assert second.base_version == first.result_version
    assert body2["method"]["details"]["forgotten_classes"] == [1, 2, 5]
    assert body2["method"]["details"]["task_classes"] == [5]
    version2 = engine.registry.resolve(VIT_MODEL, second.result_version)
    assert json.loads(version2.tags["lethe.erased_classes"]) == [1, 2, 5]
    assert engine.registry.serving_version(VIT_MODEL) == second.result_version

    verification = body2["verification"]
    continual2 = verification["continual"]
    assert continual2["task_classes"] == [5] and continual2["earlier_classes"] == [1, 2]
    assert continual2["erased_classes"] == [1, 2, 5]
    assert continual2["acc_f"] == verification["forget_acc_after"] <= VIT_POLICY.class_forget_max_accuracy
    # No record of 1 or 2 remains after the first purge: Acc_o is evaluated on nothing and says so.
    assert continual2["acc_o"] is None and continual2["acc_o_records"] == 0
    assert "evaluated on nothing" in continual2["acc_o_note"]
    checks = _checks(body2)
    assert set(checks) == {"utility", "forgetting", "forgetting_earlier", "onnx_parity", "onnx_utility"}
    assert checks["forgetting_earlier"]["passed"] is None and "not checkable" in checks["forgetting_earlier"]["reason"]
    assert all(c["passed"] for name, c in checks.items() if name != "forgetting_earlier")
    assert verification["sizes"]["utility"] == verification["sizes"]["audit"]  # 1, 2, 5 all gone
    assert verification["onnx"]["max_abs_diff"] <= VIT_POLICY.onnx_tolerance
    assert verification["onnx"]["providers"] == ["CPUExecutionProvider"]
    print("\nViT evidence:", json.dumps({
        f"task{i}": {"acc_f": b["verification"]["continual"]["acc_f"],
                     "acc_o": b["verification"]["continual"]["acc_o"],
                     "utility_before": b["verification"]["utility_acc_before"],
                     "utility_after": b["verification"]["utility_acc_after"],
                     "onnx_max_abs_diff": b["verification"]["onnx"]["max_abs_diff"],
                     "onnx_exporter": b["verification"]["onnx"]["exporter"],
                     "onnx_utility": b["verification"]["onnx"]["utility_acc"]}
        for i, b in ((1, body1), (2, body2))}))


def test_acc_o_is_measured_when_records_of_earlier_classes_remain():
    """Should records of an earlier-erased class still exist (not the case after a purge), Acc_o is a number
    and a gated check; when none remain the check says it cannot run."""
    import torch

    from unlearn.data import classification_examples
    from unlearn.gate import GatePolicy, judge
    from unlearn.tasks import ClassificationTask

    class Constant(torch.nn.Module):  # always predicts class 3
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(3), 10).float())

        def forward(self, inputs):
            return self.bias.expand(len(inputs), 10)

    task = ClassificationTask(10)
    earlier = classification_examples(torch.zeros(4, 64), torch.tensor([1, 1, 2, 3]))
    forget = classification_examples(torch.zeros(3, 64), torch.tensor([5, 5, 5]))
    audit = classification_examples(torch.zeros(4, 64), torch.tensor([3, 3, 4, 4]))
    result = judge(task, Constant(), Constant(), forget, audit, audit, GatePolicy(), (5,), None, (1, 2, 3), earlier)
    evidence = result.evidence["continual"]
    assert evidence["acc_o"] == evidence["acc_o_before"] == 0.25 and evidence["acc_o_records"] == 4
    assert "forgetting_earlier" in result.failures  # 0.25 > class_forget_max_accuracy
    empty = judge(task, Constant(), Constant(), forget, audit, audit, GatePolicy(), (5,), None, (1, 2), None)
    assert empty.evidence["continual"]["acc_o"] is None
    assert "evaluated on nothing" in empty.evidence["continual"]["acc_o_note"]
    assert "forgetting_earlier" not in empty.failures


def test_subject_erasure_against_a_class_only_policy_is_refused_up_front(vit_engine):
    """gslora++ erases whole classes; a subject erasure naming the ViT is refused before anything is stored."""
    from service.domain import InvalidArgument

    before = len(vit_engine.list_jobs(JobFilter()))
    with pytest.raises(InvalidArgument) as error:
        vit_engine.submit_erasure(ErasureRequest(request_id="vit-subject", subject_ids=("subject-0001",),
                                                 model_names=(VIT_MODEL,)))
    (violation,) = error.value.violations
    assert violation.field == "method" and "whole classes only" in violation.description
    assert len(vit_engine.list_jobs(JobFilter())) == before
    with pytest.raises(Exception):
        vit_engine.get_certificate("vit-subject")
