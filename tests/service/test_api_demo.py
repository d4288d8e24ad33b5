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
    assert len(documents) == 5  # 3 subjects, 1 class, 1 person erased from the language model
    assert sum("VALID (" in line for line in lines) == 5
    bodies = [json.loads(document["body_json"]) for document in documents]
    # Each certificate names the chain's attempts; the last one passed the gate (an escalation may reach an
    # exact retrain, labelled so).
    for body in bodies:
        assert body["attempts"][-1]["gate_passed"] is True and body["method"]["name"] == body["attempts"][-1]["method"]
        assert body["label"] == ("exact" if body["method"]["name"] == "retrain" else "approximate")
    assert any(body["classes"] == [7] for body in bodies)
    assert any(body["model_name"] == "tiny-gpt" and body["records"]["matched"] > 0 for body in bodies)
    assert any(line.strip().startswith("lethe_records_erased_total") for line in lines)
    assert "audit chain: VALID" in capsys.readouterr().err
