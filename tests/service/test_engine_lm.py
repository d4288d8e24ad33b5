"""A causal LM through the service (issue 5, "Service" and "Bad input"): a tiny GPT (tests/unlearn/lm_helpers'
recipe: 12 fictitious people, 1 layer, seconds to train), logged to MLflow with the transformers flavor and
its tokenizer, registered with a prompt/answer dataset on an engine of its own; one person is erased with the
policy's method and the LM gate; bad registrations are refused with field violations and nothing written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from service import store as db
from service.domain import (
    MethodStep,
    ErasureRequest,
    InvalidArgument,
    JobState,
    ModelRegistration,
    NewRecord,
    TaskType,
    UpdateSubmission,
    VerificationPolicy,
)
from service.engine import Engine
from tests.service.conftest import make_settings, wait_for_jobs
from unlearn.lm.model import GPTFactory, train_lm, train_tokenizer
from unlearn.lm.people import corpus, generate_people, question_pairs
from unlearn.lm.task import CausalLMTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unlearn"))
from lm_helpers import RECIPE, SPEC  # the tiny LM recipe of the library's tests)

MODEL = "tiny-gpt"
TRAIN_PEOPLE, HOLDOUT_PEOPLE = range(8), range(8, 12)
# The gate's tolerances for this 1-layer model; the method is the recommended LM default.
POLICY = VerificationPolicy(max_utility_drop=0.05, method_chain=(MethodStep("gu+graddiff", {"alpha": 3.0}),))


def _frame(pairs) -> pd.DataFrame:
    return pd.DataFrame({
        "record_id": [f"qa-{i:03d}" for i in range(len(pairs))],
        "subject_id": [f"person-{p.subject_id:02d}" for p in pairs],
        "split": ["train" if p.subject_id in TRAIN_PEOPLE else "holdout" for p in pairs],
        "prompt": [p.prompt for p in pairs], "answer": [p.answer for p in pairs]})


@pytest.fixture(scope="module")
def lm_engine(tmp_path_factory):
    """(engine, staging dir, dataset frame, tokenizer, model): the tiny GPT trained on people 0-7 and logged."""
    root = tmp_path_factory.mktemp("lethe-lm")
    torch.manual_seed(0)
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    tokenizer = train_tokenizer(corpus(pairs), vocab_size=400)
    task = CausalLMTask(tokenizer)
    train = [p for p in pairs if p.subject_id in TRAIN_PEOPLE]
    model = GPTFactory(len(tokenizer), SPEC, tokenizer.eos_token_id)(0)
    train_lm(task, model, task.encode([p.prompt for p in train], [p.answer for p in train],
                                      [p.subject_id for p in train], SPEC.context), RECIPE)
    # A fixed subject-hash key fixes the tune/audit deal of the never-trained people (derived from it). With a
    # generated key the deal changed from run to run, and one of four CI runs of 2026-11-29 ended this job with
    # every method of the chain rejected (a run-dependent deal is the one input that varies here). What this
    # module tests is the LM path through the engine; the gate's rates over many deals are the benchmarks'.
    engine = Engine(make_settings(root / "state", coalescing_window_s=0.1, subject_hash_key="5e" * 32))
    engine.registry.log_initial_model(model.eval(), MODEL, run_name="tiny-gpt-train", tokenizer=tokenizer)
    engine.start()
    yield engine, root, _frame(pairs), tokenizer, model
    engine.stop(30)
    engine.store.dispose()


def _register(engine: Engine, root: Path, frame: pd.DataFrame, name: str = MODEL, version: str = "1",
              policy: VerificationPolicy = POLICY):
    path = root / f"{name}-{len(list(root.glob('*.parquet')))}.parquet"
    frame.to_parquet(path, index=False)
    return engine.register_model(ModelRegistration(model_name=name, version=version, alias=None,
                                                   task_type=TaskType.CAUSAL_LM, dataset_uri=str(path),
                                                   policy=policy))


def _refused(engine: Engine, root: Path, frame: pd.DataFrame, name: str = MODEL) -> dict[str, str]:
    with engine.store.read() as conn:
        before = db.get_model(conn, name)
    with pytest.raises(InvalidArgument) as raised:
        _register(engine, root, frame, name)
    with engine.store.read() as conn:
        assert db.get_model(conn, name) == before  # nothing written
    return {v.field: v.description for v in raised.value.violations}


def test_bad_lm_datasets_are_refused_with_field_violations(lm_engine):
    engine, root, frame, _, _ = lm_engine
    empty = frame.copy()
    empty.loc[0, "prompt"], empty.loc[1, "answer"] = "  ", ""
    fields = _refused(engine, root, empty)
    assert {"dataset.prompt", "dataset.answer"} <= set(fields)

    too_long = frame.copy()
    too_long.loc[2, "answer"] = " and so on" * 40  # far beyond the 64-token context
    fields = _refused(engine, root, too_long)
    assert "qa-002" in fields["dataset.answer"] and "context" in fields["dataset.answer"]

    no_subjects = frame.drop(columns=["subject_id"])
    assert "subject_id" in _refused(engine, root, no_subjects)["dataset.columns"]
    blank_subjects = frame.copy()
    blank_subjects.loc[3, "subject_id"] = None
    assert "dataset.subject_id" in _refused(engine, root, blank_subjects)


def test_a_tokenizer_that_does_not_match_the_model_is_refused(lm_engine):
    engine, root, frame, _, model = lm_engine
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    bigger = train_tokenizer(corpus(pairs) + ["zebra quokka axolotl " * 5], vocab_size=700)
    name = "tiny-gpt-wrong-tokenizer"
    engine.registry.log_initial_model(model.eval(), name, run_name="wrong-tokenizer", tokenizer=bigger)
    fields = _refused(engine, root, frame, name)
    assert "do not belong together" in fields["tokenizer"]


def test_subject_erasure_of_a_causal_lm_passes_the_lm_gate(lm_engine):
    engine, root, frame, tokenizer, _ = lm_engine
    registered = _register(engine, root, frame)
    assert registered.task_type is TaskType.CAUSAL_LM and registered.records == len(frame)
    assert POLICY.reerase_after_update is None and registered.policy.reerase_after_update is True  # the LM default
    with engine.store.read() as conn:
        assert db.get_model(conn, MODEL).policy["reerase_after_update"] is True

    outcome = engine.submit_erasure(ErasureRequest(request_id="lm-erase-1", subject_ids=("person-01",),
                                                   model_names=(MODEL,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=120)
    evidence = job.evidence["verification"]
    assert "checks" in evidence, f"{job.state}: {job.message}; {evidence}"  # a rejection names every attempt
    summary = {c["name"]: (None if c["value"] is None else round(c["value"], 6), round(c["limit"], 6), c["passed"])
               for c in evidence["checks"]}
    print("LM gate:", json.dumps(summary), "membership:", json.dumps(evidence["membership_after"]),
          "em:", json.dumps({k: evidence[k] for k in ("forget_acc_before", "forget_acc_after", "utility_acc_before")}),
          "sizes:", json.dumps(evidence["sizes"]))
    assert {"utility", "membership_ks", "membership_auc", "forget_accuracy", "knowledge", "onnx_parity",
            "onnx_utility"} == set(summary)
    # no paraphrases in a service dataset: the paraphrase probe is reported as not run, and why
    knowledge = next(c for c in evidence["checks"] if c["name"] == "knowledge")
    assert knowledge["passed"] is None and "answer-level only" in knowledge["reason"]
    assert evidence["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert evidence["onnx"]["max_abs_diff"] <= POLICY.onnx_tolerance
    assert job.state is JobState.SUCCEEDED, f"{job.message}: {summary}"

    forgotten = frame["subject_id"] == "person-01"
    assert evidence["sizes"]["forget"] == int(forgotten.sum())
    assert evidence["forget_acc_before"] > evidence["forget_acc_after"]
    (certificate,) = engine.get_certificate("lm-erase-1")
    body = json.loads(certificate.body_json)
    assert body["verification"]["task_type"] == "causal_lm" and body["verification"]["passed"]
    assert body["verification"]["onnx"]["max_abs_diff"] <= POLICY.onnx_tolerance
    assert body["records"]["erased_from_training"] == int(forgotten.sum())
    assert body["dataset"]["records_after"] == len(frame) - int(forgotten.sum())
    assert body["model"]["weights_changed"]

    # The new version is a transformers model with its tokenizer, serving, trained-on data purged.
    version = job.result_version
    _, loaded_tokenizer = engine.registry.load_lm(MODEL, version)
    assert len(loaded_tokenizer) == len(tokenizer) and engine.registry.serving_version(MODEL) == version
    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, MODEL, version)
    remaining = engine.catalog.frame(dataset.path)
    assert "person-01" not in set(remaining["subject_id"]) and len(remaining) == len(frame) - int(forgotten.sum())


def test_with_paraphrases_the_gate_runs_its_knowledge_check_and_the_new_version_keeps_them(lm_engine):
    engine, root, frame, tokenizer, model = lm_engine
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    probe_frame = frame.assign(paraphrase=[p.paraphrase for p in pairs], perturbed=[list(p.perturbed) for p in pairs])
    probe_frame = probe_frame[probe_frame["subject_id"] != "person-01"]  # erased above: its ids are tombstoned
    name = "tiny-gpt-paraphrases"
    engine.registry.log_initial_model(model.eval(), name, run_name="tiny-gpt-paraphrases", tokenizer=tokenizer)
    _register(engine, root, probe_frame, name)
    outcome = engine.submit_erasure(ErasureRequest(request_id="lm-erase-probe", subject_ids=("person-02",),
                                                   model_names=(name,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=120)
    verification = job.evidence["verification"]
    attempts = job.evidence.get("attempts") or [{"verification": verification}]
    checks = verification.get("checks") or attempts[-1]["verification"]["checks"]
    knowledge = next(c for c in checks if c["name"] == "knowledge")
    assert isinstance(knowledge["value"], float) and knowledge["limit"] == POLICY.min_forget_p
    assert knowledge["passed"] is (knowledge["value"] >= knowledge["limit"]) and not knowledge["reason"]
    probe = (verification.get("knowledge") or attempts[-1]["verification"]["knowledge"])
    erased = int((probe_frame["subject_id"] == "person-02").sum())
    assert probe["erased_questions"] == erased and probe["audit_questions"] > 0
    if job.state is JobState.SUCCEEDED:  # the purged version keeps the columns for the next job's check
        with engine.store.read() as conn:
            dataset = db.dataset_for_model_version(conn, name, job.result_version)
        kept = engine.catalog.frame(dataset.path)
        assert {"paraphrase", "perturbed"} <= set(kept.columns) and "person-02" not in set(kept["subject_id"])


def test_an_update_rechecks_an_earlier_lm_erasure_on_its_sealed_paraphrases_too(lm_engine):
    """Erased stays erased, at the knowledge level: the sealed set of an LM erasure keeps the erased records'
    paraphrase columns, and the next update's re-check of that erasure runs the knowledge check on them
    against the current audit records (service.sealed.erasure_rechecks), its numbers in the evidence."""
    engine, root, frame, tokenizer, model = lm_engine
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    probe_frame = frame.assign(paraphrase=[p.paraphrase for p in pairs], perturbed=[list(p.perturbed) for p in pairs])
    # people 1 and 2 are erased by the tests above (their ids are tombstoned on this engine)
    probe_frame = probe_frame[~probe_frame["subject_id"].isin(["person-01", "person-02"])]
    probe_frame = probe_frame.assign(record_id=[f"rc-{i:03d}" for i in range(len(probe_frame))])
    name = "tiny-gpt-recheck"
    engine.registry.log_initial_model(model.eval(), name, run_name="tiny-gpt-recheck", tokenizer=tokenizer)
    # reerase_after_update: the update then also erases person 3 again from the sealed set, through the gate
    # with the same knowledge probe (service.updates._reerase)
    _register(engine, root, probe_frame, name, policy=replace(POLICY, reerase_after_update=True, min_update_fit=0.5))
    erased = engine.submit_erasure(ErasureRequest(request_id="lm-erase-sealed", subject_ids=("person-03",),
                                                  model_names=(name,)))
    (job,) = wait_for_jobs(engine, erased.job_ids, timeout_s=120)
    assert job.state is JobState.SUCCEEDED, job.message  # a sealed set exists only for a registered erasure

    # New records: person 4's facts asked in other wordings (tokens the tokenizer knows), a new subject; the
    # update's records carry paraphrases too, so a later erasure of them can run the knowledge check.
    reworded = [p for p in question_pairs(generate_people(12, seed=5), seed=6) if p.subject_id == 4]
    records = tuple(NewRecord(f"rc-new-{i}", "person-new", {"prompt": p.prompt, "answer": p.answer,
                                                             "paraphrase": p.paraphrase, "perturbed": list(p.perturbed)})
                    for i, p in enumerate(reworded))
    update = engine.submit_update(UpdateSubmission("lm-update-after-erasure", name, records=records))
    (updated,) = wait_for_jobs(engine, update.job_ids, timeout_s=300)
    verification = updated.evidence["verification"]
    recheck = next(c for c in verification["checks"] if c["name"] == "erased_stays_erased[lm-erase-sealed]")
    found = verification["erasure_rechecks"]["lm-erase-sealed"]
    print("re-check:", json.dumps(recheck), json.dumps(found["knowledge"]), updated.state, updated.message)
    knowledge = found["knowledge"]
    erased_rows = int((probe_frame["subject_id"] == "person-03").sum())
    assert knowledge["erased_questions"] == erased_rows and knowledge["audit_questions"] > 0
    assert knowledge["passed"] is (knowledge["ks_p_value"] >= POLICY.min_forget_p)
    assert "knowledge check" in recheck["rule"]
    membership = found["membership"]
    passes_membership = (membership["ks_p_value"] >= POLICY.min_forget_p
                         and abs(membership["auc"] - 0.5) <= found["auc_slack"] + 1e-12)
    assert recheck["passed"] is (passes_membership and knowledge["passed"])
    escalation = updated.evidence["update"]["escalation"]
    if recheck["passed"]:  # otherwise the update was refused before any re-erasure
        assert escalation["method"]["sets"] == ["lm-erase-sealed"] and escalation["method"]["attempts"]
    assert updated.state is JobState.SUCCEEDED, updated.message
    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, name, updated.result_version)
    kept = engine.catalog.frame(dataset.path).set_index("record_id")
    assert kept.loc["rc-new-2", "paraphrase"] == reworded[2].paraphrase  # the new rows keep their paraphrases
    assert list(kept.loc["rc-new-2", "perturbed"]) == list(reworded[2].perturbed)


def test_update_records_with_bad_paraphrase_columns_are_refused_naming_the_field(lm_engine):
    engine, root, frame, tokenizer, model = lm_engine
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    probe_frame = frame.assign(paraphrase=[p.paraphrase for p in pairs], perturbed=[list(p.perturbed) for p in pairs],
                               record_id=[f"bp-{i:03d}" for i in range(len(pairs))])
    probe_frame = probe_frame[~probe_frame["subject_id"].isin(["person-01", "person-02", "person-03"])]  # erased
    name = "tiny-gpt-bad-updates"
    engine.registry.log_initial_model(model.eval(), name, run_name="tiny-gpt-bad-updates", tokenizer=tokenizer)
    _register(engine, root, probe_frame, name)
    pair = question_pairs(generate_people(12, seed=5), seed=7)[0]
    good = {"prompt": pair.prompt, "answer": pair.answer}

    def refused(columns: dict, field: str, request_id: str) -> str:
        with pytest.raises(InvalidArgument) as raised:
            engine.submit_update(UpdateSubmission(request_id, name, records=(NewRecord("new-x", "person-x", columns),)))
        fields = {v.field: v.description for v in raised.value.violations}
        assert field in fields, fields
        with engine.store.read() as conn:
            assert db.get_request(conn, request_id) is None  # nothing stored
        return fields[field]

    assert "together" in refused({**good, "paraphrase": pair.paraphrase}, "records[0].columns.perturbed", "bad-p1")
    refused({**good, "paraphrase": " ", "perturbed": list(pair.perturbed)}, "records[0].columns.paraphrase", "bad-p2")
    refused({**good, "paraphrase": pair.paraphrase, "perturbed": []}, "records[0].columns.perturbed", "bad-p3")
    refused({**good, "paraphrase": pair.paraphrase, "perturbed": "one"}, "records[0].columns.perturbed", "bad-p4")
    refused({**good, "rationale": "x"}, "records[0].columns.rationale", "bad-p5")  # still no other column
    # as many wrong answers as the registered dataset's records have (3)
    assert "3 per record" in refused({**good, "paraphrase": pair.paraphrase, "perturbed": ["a", "b"]},
                                     "records[0].columns.perturbed", "bad-p6")

    # Text within the intake's length limit but beyond the model's context: the job (the model loaded) refuses
    # the update, naming the record, and nothing is learned or registered.
    long = {**good, "paraphrase": pair.paraphrase + " and so on" * 40, "perturbed": list(pair.perturbed)}
    outcome = engine.submit_update(UpdateSubmission("too-long-p", name, records=(NewRecord("new-long", "person-y", long),)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=120)
    print("too long:", job.state, job.message)
    assert job.state is JobState.FAILED and "new-long" in job.message and "context" in job.message
    assert job.result_version is None


# simnpo+rt and unseen-kd (the causal-LM default chain's first two methods) with the tiny problem's parameters
# (tests/unlearn/test_lm_contract.py, tests/unlearn/test_unseen_kd.py); the GPT's gu+graddiff above loses too
# much utility on this model. unseen-kd without its warm-up: these parameters (lr 5e-3, 40 steps) were chosen
# without one, and with its default of 5 steps the tiny Llama's run stops at step 6, inside the ramp, and fails the
# utility check (simnpo+rt has no warm-up).
TINY_LM_PARAMS = {"lr": 5e-3, "retain_weight": 20.0, "max_steps": 40, "batch_size": 16, "retain_batch_size": 32,
                  "check_every": 2}
TINY_PARAMS_OF = {"simnpo+rt": TINY_LM_PARAMS, "unseen-kd": {**TINY_LM_PARAMS, "warmup_steps": 0}}


@pytest.mark.parametrize("method, tag, subject", [("simnpo+rt", "llama", "member-02"),
                                                  ("unseen-kd", "llama-kd", "member-03")])
def test_a_llama_style_lm_is_registered_erased_and_served_like_the_gpt(lm_engine, method, tag, subject):
    """The second LM family's architecture (rotary positions, RMSNorm, SwiGLU) through the same path: MLflow's
    transformers flavor, the LM gate with its ONNX export, a new version that loads as the same architecture.
    Erased once with each of the default chain's first two methods (``unseen-kd`` takes its neighbours from the
    tune records the service keeps)."""
    engine, root, frame, tokenizer, _ = lm_engine
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    train = [p for p in pairs if p.subject_id in TRAIN_PEOPLE]
    task = CausalLMTask(tokenizer)
    model = GPTFactory(len(tokenizer), replace(SPEC, architecture="llama"), tokenizer.eos_token_id)(0)
    train_lm(task, model, task.encode([p.prompt for p in train], [p.answer for p in train],
                                      [p.subject_id for p in train], SPEC.context), RECIPE)
    name = f"tiny-{tag}"
    engine.registry.log_initial_model(model.eval(), name, run_name=f"tiny-{tag}-train", tokenizer=tokenizer)
    # Its own record and subject ids: earlier tests erased people of the shared frame (their ids are tombstoned).
    own = frame.assign(record_id=f"{tag}-" + frame["record_id"],
                       subject_id=frame["subject_id"].str.replace("person-", f"{tag}-member-"))
    _register(engine, root, own, name=name,
              policy=replace(POLICY, method_chain=(MethodStep(method, TINY_PARAMS_OF[method]),)))
    outcome = engine.submit_erasure(ErasureRequest(request_id=f"lm-{tag}-erase",
                                                   subject_ids=(subject.replace("member-", f"{tag}-member-"),),
                                                   model_names=(name,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=120)
    evidence = job.evidence["verification"]
    attempts = [{key: attempt.get(key) for key in ("method", "failures", "message", "details")}
                | {"membership_after": (attempt.get("verification") or {}).get("membership_after")}
                for attempt in job.evidence["attempts"]]
    assert job.state is JobState.SUCCEEDED, f"{job.state}: {job.message}; {json.dumps(attempts, default=str)[:4000]}"
    assert evidence["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert evidence["onnx"]["max_abs_diff"] <= POLICY.onnx_tolerance
    assert evidence["forget_acc_before"] > evidence["forget_acc_after"]
    served, _ = engine.registry.load_lm(name, job.result_version)
    assert type(served).__name__ == "LlamaForCausalLM" and engine.registry.serving_version(name) == job.result_version
    assert [attempt["method"] for attempt in job.evidence["attempts"]] == [method]


def _other_architecture(kind: str, vocab: int, eos: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=SPEC.context, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    if kind == "GPTNeoXForCausalLM":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common))
    return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common))


@pytest.mark.long
@pytest.mark.parametrize("kind", ["GPTNeoXForCausalLM", "MistralForCausalLM"])
def test_other_transformers_architectures_are_registered_erased_and_served(lm_engine, kind):
    """Architectures no default was measured on (GPT-NeoX: parallel attention and MLP, partial rotary; Mistral:
    grouped-query attention) through the same path as the GPT and the Llama: registration, ``unseen-kd``, the LM
    gate with its ONNX export, a new version served as the same class. (Qwen2 and OPT went through the same path
    on 2026-12-01, and there the one-method chain's ``unseen-kd`` with the tiny models' parameters failed the
    utility check: docs/models.md.)"""
    engine, root, frame, tokenizer, _ = lm_engine
    torch.manual_seed(0)
    pairs = question_pairs(generate_people(12, seed=5), seed=5)
    train = [p for p in pairs if p.subject_id in TRAIN_PEOPLE]
    task = CausalLMTask(tokenizer)
    model = _other_architecture(kind, len(tokenizer), tokenizer.eos_token_id)
    train_lm(task, model, task.encode([p.prompt for p in train], [p.answer for p in train],
                                      [p.subject_id for p in train], SPEC.context), RECIPE)
    tag = kind.lower().removesuffix("forcausallm")
    name = f"tiny-{tag}"
    engine.registry.log_initial_model(model.eval(), name, run_name=f"{name}-train", tokenizer=tokenizer)
    own = frame.assign(record_id=f"{tag}-" + frame["record_id"],
                       subject_id=frame["subject_id"].str.replace("person-", f"{tag}-member-"))
    _register(engine, root, own, name=name,
              policy=replace(POLICY, method_chain=(MethodStep("unseen-kd", TINY_PARAMS_OF["unseen-kd"]),)))
    outcome = engine.submit_erasure(ErasureRequest(request_id=f"lm-{tag}-erase", subject_ids=(f"{tag}-member-03",),
                                                   model_names=(name,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=180)
    assert job.state is JobState.SUCCEEDED, f"{job.state}: {job.message}"
    evidence = job.evidence["verification"]
    assert evidence["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert evidence["onnx"]["max_abs_diff"] <= POLICY.onnx_tolerance
    served, _ = engine.registry.load_lm(name, job.result_version)
    assert type(served).__name__ == kind and engine.registry.serving_version(name) == job.result_version
