"""The audit chain and certificates verify offline, and any tampering is detected."""

from __future__ import annotations

import json
import sqlite3

import pytest

from service.audit import main as audit_main
from service.audit import verify_audit
from service.domain import ErasureRequest
from tests.service.conftest import fresh_subjects, wait_for_jobs


@pytest.fixture(scope="module")
def certified(lethe_engine):
    """At least one certified erasure in the session's store."""
    outcome = lethe_engine.submit_erasure(ErasureRequest(request_id="audit-1", subject_ids=fresh_subjects(1)))
    wait_for_jobs(lethe_engine, outcome.job_ids)


@pytest.fixture
def audited_copy(certified, lethe_engine, lethe_state, tmp_path):
    """A copy of the session's job store (tampering stays local to the copy)."""
    copy = tmp_path / "lethe.db"
    with sqlite3.connect(lethe_state / "lethe.db") as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return copy, lethe_engine.settings.audit_key_bytes


def test_chain_and_certificates_verify_offline(lethe_state, audited_copy, capsys):
    report = verify_audit(lethe_state)
    assert report.valid, report.errors
    assert report.entries > 0 and report.certificates > 0
    assert audit_main(["verify", "--state-dir", str(lethe_state)]) == 0
    assert json.loads(capsys.readouterr().out)["chain"]["valid"] is True


@pytest.mark.parametrize("tamper, expected", [
    ("UPDATE audit_log SET body_json = body_json || ' ' WHERE seq = 2", "altered"),  # whatever entry 2 is
    ("DELETE FROM audit_log WHERE seq = 3", "expected sequence 3"),
    ("UPDATE certificates SET body_json = replace(body_json, '\"approximate\"', '\"exact\"')", "signature"),
    # the first byte always changes (a signature that already began with 00 made the old '00' || ... a no-op, 1 in 256)
    ("UPDATE audit_log SET signature = (CASE WHEN substr(signature, 1, 2) = '00' THEN 'ff' ELSE '00' END)"
     " || substr(signature, 3) WHERE seq = 1", "bad signature"),
])
def test_tampering_is_detected(audited_copy, tamper, expected):
    path, key = audited_copy
    with sqlite3.connect(path) as conn:
        assert conn.execute(tamper).rowcount > 0
    report = verify_audit(f"sqlite:///{path}", key)
    assert not report.valid
    assert any(expected in error for error in report.errors), report.errors


def test_wrong_key_and_forged_certificate(lethe_engine, audited_copy):
    path, _ = audited_copy
    assert not verify_audit(f"sqlite:///{path}", b"\x01" * 32).valid
    (certificate,) = lethe_engine.get_certificate("audit-1")
    forged = certificate.body_json.replace('"approximate"', '"exact"')
    check = lethe_engine.verify_certificate(forged, certificate.signature)
    assert not check.valid and "signature" in check.reason
    assert lethe_engine.verify_certificate(certificate.body_json, certificate.signature).valid
