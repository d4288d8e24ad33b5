"""Generated code is built from proto/, never committed: importing service.api.pb regenerates it when it
is missing or stale (hash of the .proto files and of the protoc/protobuf versions)."""

from __future__ import annotations

import shutil

import pytest

from service.api import codegen


@pytest.fixture
def scratch_codegen(tmp_path, monkeypatch):
    """codegen pointed at a copy of proto/ and a scratch output directory."""
    proto_root = tmp_path / "proto"
    shutil.copytree(codegen.PROTO_ROOT, proto_root)
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    monkeypatch.setattr(codegen, "PROTO_ROOT", proto_root)
    monkeypatch.setattr(codegen, "PROTO_PACKAGE_DIR", proto_root / "lethe" / "v1")
    monkeypatch.setattr(codegen, "API_DIR", api_dir)
    monkeypatch.setattr(codegen, "GENERATED_DIR", api_dir / "_generated")
    monkeypatch.setattr(codegen, "LOCK_PATH", api_dir / "_generated.lock")
    monkeypatch.setattr(codegen, "_forget_stale_modules", lambda: None)  # keep this process's real modules
    return codegen


def test_missing_code_is_generated_with_package_imports_and_a_stamp(scratch_codegen):
    assert not scratch_codegen.is_fresh()
    scratch_codegen.ensure_generated()
    package = scratch_codegen.GENERATED_DIR / "lethe" / "v1"
    service_module = (package / "unlearning_service_pb2.py").read_text()
    assert "from service.api._generated.lethe.v1 import types_pb2" in service_module
    assert "from lethe.v1 import" not in service_module
    for name in ("__init__.py", "types_pb2.py", "types_pb2.pyi", "unlearning_service_pb2_grpc.py"):
        assert (package / name).exists(), name
    assert scratch_codegen.is_fresh()
    assert not list(scratch_codegen.API_DIR.glob("_generated.*/"))  # no staging directory left behind


def test_an_edited_proto_makes_the_code_stale_and_it_is_regenerated(scratch_codegen):
    scratch_codegen.ensure_generated()
    stamp = scratch_codegen.generated_stamp()
    proto = scratch_codegen.PROTO_PACKAGE_DIR / "types.proto"
    proto.write_text(proto.read_text().replace("message Certificate {", "message Certificate {\n  // edited"))
    assert not scratch_codegen.is_fresh()
    scratch_codegen.ensure_generated()
    assert scratch_codegen.is_fresh() and scratch_codegen.generated_stamp() != stamp


def test_the_real_generated_code_is_fresh():
    import service.api.pb  # noqa: F401  (the import itself regenerates when needed)

    assert codegen.is_fresh()
    assert codegen.main(["--check"]) == 0


def _buf() -> str | None:
    import sys
    from pathlib import Path

    beside_python = Path(sys.executable).with_name("buf")
    return str(beside_python) if beside_python.exists() else shutil.which("buf")


# The first lethe.v1 protos (Update and Rectification designed, UNIMPLEMENTED) and the protos before updates
# and rectifications were built: the API only grew since (buf's FILE rules).
BREAKING_BASELINES = ("3a96133", "9236620")


@pytest.mark.skipif(_buf() is None, reason="buf is not installed (pip install buf-bin)")
@pytest.mark.parametrize("baseline", BREAKING_BASELINES)
def test_protos_have_no_breaking_change_against_earlier_versions(baseline, tmp_path):
    import subprocess
    import tarfile

    archive = tmp_path / "baseline.tar"
    exported = subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), baseline, "proto"],
                              cwd=codegen.REPO_ROOT, capture_output=True, text=True)
    if exported.returncode != 0:
        pytest.skip(f"commit {baseline} is not in this clone's history (a shallow clone?): {exported.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "baseline", filter="data")
    result = subprocess.run([_buf(), "breaking", "proto", "--against", str(tmp_path / "baseline" / "proto")],
                            cwd=codegen.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(_buf() is None, reason="buf is not installed (pip install buf-bin)")
def test_protos_pass_buf_lint_and_format():
    import subprocess

    for command in (["lint", "proto"], ["format", "--diff", "--exit-code", "proto"]):
        result = subprocess.run([_buf(), *command], cwd=codegen.REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
