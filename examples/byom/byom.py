"""Bring your own model to Lethe, end to end: the script a platform team copies (docs/models.md).

    python examples/byom/byom.py                        # everything in a fresh temporary directory
    python examples/byom/byom.py --state-dir ./byom     # ... or here, kept afterwards
    python examples/byom/byom.py --target lethe.example:50051 --tracking-uri https://mlflow.example
                                                        # a Lethe already running, and its MLflow

Nine steps, one line each on stderr; the last line on stdout is a JSON summary:

1. train a small PyTorch MLP (``cancer_mlp.py``) on scikit-learn's breast-cancer data (569 patients);
2. log it to MLflow as Lethe needs it: the pytorch flavor, ``serialization_format="pickle"``, its module in
   ``code_paths``, explicit ``pip_requirements``, a signature and an input example; alias ``champion``;
3. write the training data as Parquet in Lethe's schema (one patient = one data subject), and check it
   with ``lethe dataset check``;
4. start ``lethe serve`` (embedded mode, in the state directory, accepting datasets from it) on a free port,
   unless ``--target``;
5. ``lethe register --alias champion`` with the model's factory and training recipe;
6. load the registered version in a fresh Python process (only MLflow and torch; no path to this folder):
   what your serving stack does;
7. ``lethe submit`` an erasure of one patient and follow it to its certificate;
8. verify the certificate with the server and offline (``lethe audit verify``);
9. load the NEW version Lethe registered the same way, and see where ``champion`` points now (and whether
   the version trained on the erased patient can still be loaded).

Exit status 0 when every step worked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cancer_mlp import make_model  # noqa: E402  (the model's own module, next to this script)

MODEL_NAME = "breast-cancer-mlp"
ALIAS = "champion"
# How the model is trained: the recipe Lethe's exact retrain repeats (docs/models.md, "The training recipe").
# The loop in train() below is exactly what these fields mean: Adam, cross-entropy, a new shuffle per epoch
# drawn from one generator seeded with `seed`, no scheduler, no augmentation.
RECIPE = {"epochs": 150, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam", "seed": 0}
LETHE = [sys.executable, "-m", "service.cli"]  # the `lethe` command of the environment running this script


def main() -> int:
    options = _options()
    root = Path(options.state_dir or tempfile.mkdtemp(prefix="lethe-byom-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = options.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    summary: dict = {"model": MODEL_NAME, "state_dir": str(root)}
    started = time.monotonic()
    server = None
    try:
        _say(f"[1/9] training a {RECIPE['epochs']}-epoch MLP on scikit-learn's breast-cancer data")
        frame, model, accuracy = train()
        _say(f"      holdout accuracy {accuracy:.3f}")
        version = log_model(model, frame, tracking_uri, root)
        summary["registered_version"] = version
        _say(f"[2/9] logged to MLflow ({tracking_uri}): {MODEL_NAME} version {version}, alias {ALIAS!r}")

        dataset = root / "breast-cancer.parquet"
        frame.to_parquet(dataset, index=False)
        _run([*LETHE, "dataset", "check", str(dataset), "--task", "classification", "--num-classes", "2"])
        _say(f"[3/9] wrote {dataset.name} ({len(frame)} records) and `lethe dataset check` found no problem")

        if options.target:
            target = options.target
            _say(f"[4/9] using the Lethe at {target}")
        else:
            server, target = start_server(root, tracking_uri)
            _say(f"[4/9] `lethe serve` is up on {target} (log: {root / 'server.log'})")
        lethe = [*LETHE, "--log-level", "ERROR"]

        registered = json.loads(_run([*lethe, "register", "--target", target, "--model", MODEL_NAME, "--alias", ALIAS,
                                      "--task", "classification", "--dataset", str(dataset), "--num-classes", "2",
                                      "--model-factory", "cancer_mlp:make_model",
                                      "--train-recipe", json.dumps(RECIPE)]).stdout)
        _say(f"[5/9] `lethe register`: version {registered['version']} is unlearnable "
             f"({registered['records']} records, method chain "
             f"{[step['name'] for step in registered['policy']['method_chain']]})")

        probe = root / "probe.npy"
        np.save(probe, np.stack(frame["features"].iloc[:4]).astype(np.float32))
        loaded, detail = load_in_fresh_process(tracking_uri, f"models:/{MODEL_NAME}/{version}", probe, root)
        summary.update(original_loads_in_fresh_process=loaded, original_load_detail=detail)
        _say(f"[6/9] version {version} in a fresh process: "
             + (f"loads and predicts {detail}" if loaded else f"DOES NOT LOAD: {detail}"))

        subject = frame.loc[frame["split"] == "train", "subject_id"].iloc[0]
        request_id = f"byom-erase-{subject}-{int(time.time())}"
        submitted = _run([*lethe, "submit", "--target", target, "--subject", subject, "--model", MODEL_NAME,
                          "--request-id", request_id, "--quiet"], check=False)
        summary["erased_subject"] = subject
        if submitted.returncode != 0:
            summary["job_state"] = "not SUCCEEDED"
            _say(f"[7/9] the erasure of {subject} did not succeed:\n{submitted.stderr[-2000:]}")
            return _finish(summary, started, ok=False)
        document = json.loads(submitted.stdout.strip().splitlines()[-1])
        body = json.loads(document["body_json"])
        summary.update(job_state="SUCCEEDED", method=body["method"]["name"], label=body["label"],
                       result_version=body["model"]["result_version"],
                       membership_after=body["verification"].get("membership_after"))
        _say(f"[7/9] erased {subject}: {body['method']['name']} ({body['label']}), version "
             f"{body['model']['base_version']} -> {body['model']['result_version']}, "
             f"{body['records']['matched']} record(s)")

        checked = _run([*lethe, "certificate", "--target", target, request_id, "--verify"], check=False)
        certificate_file = root / f"{request_id}.json"
        certificate_file.write_text(json.dumps(document))
        offline = None
        if not options.target:  # the audit chain lives in the embedded state directory
            audit = _run([*lethe, "audit", "verify", "--state-dir", str(root / "lethe"), "--certificate",
                          str(certificate_file)], check=False)
            offline = audit.returncode == 0 and json.loads(audit.stdout)["certificate"]["valid"]
        summary.update(certificate_valid=checked.returncode == 0 and "VALID" in checked.stderr,
                       certificate_valid_offline=offline)
        _say(f"[8/9] certificate: server says {'VALID' if summary['certificate_valid'] else 'INVALID'}, offline "
             f"check {'VALID' if offline else 'skipped (remote Lethe)' if offline is None else 'INVALID'}")

        new = summary["result_version"]
        loaded, detail = load_in_fresh_process(tracking_uri, f"models:/{MODEL_NAME}/{new}", probe, root)
        summary.update(new_version_loads_in_fresh_process=loaded, new_version_load_detail=detail)
        _say(f"[9/9] version {new} in a fresh process: "
             + (f"loads and predicts {detail}" if loaded else f"DOES NOT LOAD: {detail}"))
        summary["aliases"] = aliases(tracking_uri)
        still, _ = load_in_fresh_process(tracking_uri, f"models:/{MODEL_NAME}/{version}", probe, root)
        summary["original_loads_after_erasure"] = still
        _say(f"      {ALIAS!r} now points to version {summary['aliases'].get(ALIAS)}; version {version}, trained on "
             f"the erased patient, {'STILL loads' if still else 'no longer loads (superseded)'}")
        ok = (summary["certificate_valid"] and offline is not False and summary["original_loads_in_fresh_process"]
              and summary["new_version_loads_in_fresh_process"])
        return _finish(summary, started, ok=bool(ok))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)  # `lethe serve` drains in-flight calls and stops
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not options.state_dir and not options.keep:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ steps
def train() -> tuple[pd.DataFrame, torch.nn.Module, float]:
    """The data in Lethe's schema and a model trained with RECIPE on its ``train`` split."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    split = np.where(rng.random(len(data.target)) < 0.7, "train", "holdout")
    train_rows = split == "train"
    # Standardise with the training split's statistics; the dataset holds exactly what forward() takes.
    mean, std = data.data[train_rows].mean(axis=0), data.data[train_rows].std(axis=0)
    features = ((data.data - mean) / std).astype(np.float32)
    frame = pd.DataFrame({
        "record_id": [f"bc-{i:04d}" for i in range(len(data.target))],
        "subject_id": [f"patient-{i:04d}" for i in range(len(data.target))],  # one record per patient
        "split": split,
        "features": list(features),  # ONE list column: a float vector per record
        "label": data.target.astype(np.int64),
    })
    inputs, labels = torch.from_numpy(features), torch.from_numpy(data.target.astype(np.int64))
    model = make_model(RECIPE["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    shuffle = torch.Generator().manual_seed(RECIPE["seed"])
    x, y = inputs[train_rows], labels[train_rows]
    model.train()
    for _ in range(RECIPE["epochs"]):
        order = torch.randperm(len(x), generator=shuffle)
        for start in range(0, len(x), RECIPE["batch_size"]):
            batch = order[start:start + RECIPE["batch_size"]]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(inputs[~train_rows]).argmax(1) == labels[~train_rows]).float().mean())
    return frame, model, accuracy


def log_model(model: torch.nn.Module, frame: pd.DataFrame, tracking_uri: str, root: Path) -> str:
    """Log and register the model the way Lethe needs it; returns the new version (also aliased ALIAS)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    # MLflow warns about pickle on every save; Lethe needs pickle (pt2 cannot be trained: docs/models.md).
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name("byom-training")
    local = tracking_uri.startswith("sqlite:") or "://" not in tracking_uri  # else the tracking server decides
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        "byom-training", artifact_location=(root / "byom-artifacts").as_uri() if local else None)
    example = np.stack(frame["features"].iloc[:5]).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with mlflow.start_run(experiment_id=experiment_id, run_name="breast-cancer-mlp"):
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", code_paths=[str(HERE / "cancer_mlp.py")],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"], signature=signature,
            input_example=example[:2], registered_model_name=MODEL_NAME)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, ALIAS, version)
    return version


def start_server(root: Path, tracking_uri: str) -> tuple[subprocess.Popen, str]:
    """``lethe serve`` in embedded mode, its state under ``root / "lethe"``, its MLflow ours."""
    import grpc

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The server reads registered datasets only from its dataset roots (and <state>/incoming): here, ours.
    environment = {**os.environ, "LETHE_MLFLOW_TRACKING_URI": tracking_uri,
                   "LETHE_DATASET_ROOTS": json.dumps([str(root)])}
    log = open(root / "server.log", "w")
    server = subprocess.Popen([*LETHE, "serve", "--state-dir", str(root / "lethe"), "--host", "127.0.0.1",
                               "--port", str(port), "--metrics-port", "0"], stdout=log, stderr=subprocess.STDOUT,
                              env=environment, cwd=root)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            raise SystemExit(f"lethe serve exited with {server.returncode}:\n{(root / 'server.log').read_text()}")
        try:
            with grpc.insecure_channel(target) as channel:
                grpc.channel_ready_future(channel).result(timeout=2)
            return server, target
        except grpc.FutureTimeoutError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"lethe serve did not come up in 180 s; see {root / 'server.log'}")


def aliases(tracking_uri: str) -> dict[str, str]:
    import mlflow

    registered = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_registered_model(MODEL_NAME)
    return {alias: str(version) for alias, version in registered.aliases.items()}


LOAD_IN_FRESH_PROCESS = """
import sys
import mlflow.pytorch, numpy, torch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2]).eval()
with torch.no_grad():
    print(model(torch.from_numpy(numpy.load(sys.argv[3]))).argmax(1).tolist())
"""


def load_in_fresh_process(tracking_uri: str, model_uri: str, probe: Path, root: Path) -> tuple[bool, str]:
    """What a serving stack does: a new interpreter with MLflow and torch, NOT this folder on its path."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment["MLFLOW_CONFIGURE_LOGGING"] = "false"
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, tracking_uri, model_uri, str(probe)],
                          cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return True, f"classes {done.stdout.strip().splitlines()[-1]}"
    last = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return False, last[-1] if last else f"exit status {done.returncode}"


# ---------------------------------------------------------------------------------------------- helpers
def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise SystemExit(f"`{' '.join(command[2:])}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _finish(summary: dict, started: float, ok: bool) -> int:
    summary.update(ok=ok, seconds=round(time.monotonic() - started, 1))
    _say(f"bring-your-own-model {'succeeded' if ok else 'FAILED'} in {summary['seconds']} s")
    print(json.dumps(summary))
    return 0 if ok else 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--state-dir", help="where MLflow, the dataset and Lethe's state go (default: a temporary "
                                            "directory, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--target", help="host:port of a running Lethe (default: start `lethe serve` here)")
    parser.add_argument("--tracking-uri", help="the MLflow that Lethe reads (required with --target)")
    options = parser.parse_args()
    if options.target and not options.tracking_uri:
        parser.error("--target needs --tracking-uri: the model must be logged where Lethe looks for it")
    return options


if __name__ == "__main__":
    sys.exit(main())
