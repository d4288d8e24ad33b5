"""``lethe demo`` end to end, shortened to 3 subject erasures (plus the class erasure) to keep CI fast;
``make demo`` runs the full 20."""

from __future__ import annotations

import io
import json

import pytest

from lethe_demo.demo import run_demo


@pytest.mark.slow
@pytest.mark.long  # runs the whole demo: make test-all and make demo
def test_demo_streams_erasures_prints_verified_certificates_audit_and_metrics(tmp_path, capsys):
    out = io.StringIO()
    assert run_demo(state_dir=str(tmp_path / "state"), subjects=3, out=out) == 0
    lines = out.getvalue().splitlines()
    documents = [json.loads(line) for line in lines if line.startswith("{")]
    # 3 subjects, 1 class, 1 person erased from the language model; the update (after its refusal) and the LM
    # rectification.
    assert len(documents) == 7
    assert sum("VALID (" in line for line in lines) == 7
    bodies = [json.loads(document["body_json"]) for document in documents]
    erasures = [body for body in bodies if body["label"] in ("exact", "approximate")]
    assert len(erasures) == 5
    # Each certificate names the chain's attempts; the last one passed the gate (an escalation may reach an
    # exact retrain, labelled so).
    for body in erasures:
        assert body["attempts"][-1]["gate_passed"] is True and body["method"]["name"] == body["attempts"][-1]["method"]
        assert body["label"] == ("exact" if body["method"]["name"] == "retrain" else "approximate")
    (update,) = [body for body in bodies if body["label"] == "update"]
    assert update["update"]["records_learned"] == 30 and update["verification"]["passed"]
    (rectification,) = [body for body in bodies if body["label"] == "rectification"]
    assert rectification["model_name"] == "tiny-gpt" and rectification["dataset"]["tombstones_added"] == 1
    err = capsys.readouterr().err
    assert "refused: FAILED_PRECONDITION" in err and "erased" in err
    assert any(body["classes"] == [7] for body in bodies)
    assert any(body["model_name"] == "tiny-gpt" and body["records"]["matched"] > 0 for body in bodies)
    assert any(line.strip().startswith("lethe_records_erased_total") for line in lines)
    assert "audit chain: VALID" in err
