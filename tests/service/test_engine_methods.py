"""Every registered method is reachable from the service by name, with validated parameters.

Issue 4's seam: the gradient family plugs in by registration alone. One gradient method wrapped in GU
runs end to end through the engine; bad parameters of a gradient method are refused naming the field.
"""

from __future__ import annotations

import json

import pytest

from service.domain import ErasureRequest, InvalidArgument, JobState
from tests.service.conftest import fresh_subjects, wait_for_jobs
from unlearn import registry


def test_gu_wrapped_gradient_method_runs_through_the_engine(lethe_engine, digits_model):
    (subject,) = fresh_subjects(1)
    outcome = lethe_engine.submit_erasure(ErasureRequest(request_id="gu-graddiff-1", subject_ids=(subject,),
                                                         method="gu+graddiff"))
    (job,) = wait_for_jobs(lethe_engine, outcome.job_ids)
    assert job.method == "gu+graddiff"
    # The requested method runs first; if the gate rejects it, the model's chain continues (and the digits
    # chain ends with an exact retrain, so the request is certified either way).
    assert job.state is JobState.SUCCEEDED, job.message
    (certificate,) = lethe_engine.get_certificate(outcome.request_id)
    body = json.loads(certificate.body_json)
    first = body["attempts"][0]
    assert first["method"] == "gu+graddiff" and "rank" in first["config"]  # the GU half of the config too
    assert first["target_reached"] is not None  # the method said whether it reached its own stop target
    assert body["attempts"][-1]["gate_passed"] is True


@pytest.mark.parametrize("method", ["ga", "npo", "iau", "gu+ga"])
def test_gradient_method_parameters_are_validated(lethe_engine, digits_model, method):
    spec = registry.get(method)
    with pytest.raises(InvalidArgument) as error:
        lethe_engine.submit_erasure(ErasureRequest(request_id=f"bad-{method}", subject_ids=fresh_subjects(1),
                                                   method=method, method_params={"no_such_knob": 1.0}))
    assert [v.field for v in error.value.violations] == ["method_params.no_such_knob"]
    assert spec.name == method
