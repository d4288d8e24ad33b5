"""The digits demo model: trained, logged to the embedded MLflow, its data written, registered unlearnable.

Used by ``lethe demo`` and by the tests (DESIGN.md, "Real data for tests and demos"): scikit-learn's
digits with synthetic subjects (:mod:`unlearn.digits`), the digits CNN trained with the benchmark's recipe
and seed, so the trained weights come from the benchmark's model cache (``LETHE_CACHE_DIR``, default
``.cache/lethe``) after the first run (about 3 s of training on 2 cores otherwise).

:func:`build_digits_vit` registers the digits ViT of :mod:`unlearn.vit` the same way, with a policy whose
default method is ``gslora++`` (class erasure on a vision transformer, issue 6).

Building twice in one state directory is a no-op that returns the name: the model is already registered.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from service import store as db
from service.domain import MethodStep, ModelRegistration, TaskType, VerificationPolicy
from service.settings import Settings
from unlearn.bench import DIGITS_RECIPE, ModelCache, default_cache_dir
from unlearn.data import classification_examples
from unlearn.digits import load_digits_records
from unlearn.tasks import ClassificationTask

log = logging.getLogger(__name__)
DEMO_MODEL = "digits-cnn"

# The demo's gate. The holdout split has 179 records, so one holdout accuracy is known to about one
# standard error of sqrt(0.98 * 0.02 / 179) ~ 0.01: margins of 2 points are two standard errors.
# The method chain is left empty: registration fills in the classifier default (unlearn.chain.DEFAULT_CHAINS).
DEMO_POLICY = VerificationPolicy(max_utility_drop=0.02, class_forget_max_accuracy=0.05, onnx_tolerance=1e-4)


LM_MODEL = "tiny-gpt"
LM_TRAIN_PEOPLE, LM_PEOPLE = 8, 12  # people 0-7 are trained on, 8-11 are the never-seen holdout
# Tolerances for a 1-layer model; gu+graddiff (alpha 3) erases a person of this tiny GPT within them,
# simnpo+rt (a method of the LM default chain, docs/results/lm.md) is the escalation.
LM_POLICY = VerificationPolicy(max_utility_drop=0.05, method_chain=(MethodStep("gu+graddiff", {"alpha": 3.0}),
                                                                 MethodStep("simnpo+rt", {})))
# One corrected fact of the tiny GPT is a single short sequence: 80 passes at twice the rate, each beside a
# replay batch of 64 old records weighted 2 so that the one new sequence does not outweigh what the model
# keeps. Chosen on persons 02-06 after person-01's erasure (the demo's order): it passed the gate on 03-06
# and was refused on 02 (utility 0.85 < 0.89), where no tried setting passed (docs/benchmarks.md, "Updates").
LM_RECTIFY_STRATEGY = ("replay", {"alpha": 0.3, "beta": 2.0, "epochs": 80, "lr_scale": 2.0, "buffer_batch_size": 64})
VIT_MODEL = "digits-vit"
# The ViT's gate: class erasure by GS-LoRA++ (issue 6). Forgetting and ONNX limits as the CNN's; utility on
# the remaining classes may fall by 3 points, the issue's tolerance for Acc_r against a retrained model
# (docs/results/gslora.md: on the digits ViT GS-LoRA++ keeps Acc_r within 0.011 of the retrained model).
VIT_POLICY = VerificationPolicy(max_utility_drop=0.03, class_forget_max_accuracy=0.05, onnx_tolerance=1e-4,
                                method_chain=(MethodStep("gslora++"),))


def digits_frame() -> pd.DataFrame:
    """Every digits record (all splits) in Lethe's dataset schema."""
    records = load_digits_records()
    return pd.DataFrame({"record_id": records.record_ids.astype(str), "subject_id": records.subject_ids.astype(str),
                         "split": records.splits, "features": [row.tolist() for row in records.features],
                         "label": records.labels})


def build_digits_demo(settings: Settings, engine=None, model_name: str = DEMO_MODEL,
                      policy: VerificationPolicy = DEMO_POLICY) -> str:
    """Train (or take from the cache), log, write the Parquet dataset and register; returns the model name.

    ``engine`` is an :class:`service.engine.Engine` on ``settings`` (one is created when omitted; it need
    not be started).
    """
    from service.engine import Engine

    engine = engine or Engine(settings)
    if _registered(engine, model_name):
        return model_name
    examples = _digits_train_examples()
    model, seconds = ModelCache(default_cache_dir()).get_or_train("original", ClassificationTask(10), examples,
                                                                  DIGITS_RECIPE, torch.device("cpu"))
    log.info("digits CNN ready (training took %.1f s when it was trained)", seconds)
    _log_and_register(engine, model, model_name, "digits-cnn-train", policy, "unlearn.models:digits_cnn",
                      asdict(DIGITS_RECIPE))
    return model_name


def build_digits_vit(settings: Settings, engine=None, model_name: str = VIT_MODEL) -> str:
    """The digits ViT (:mod:`unlearn.vit`, seed 0, trained with ``DIGITS_VIT_RECIPE`` and cached by
    :func:`unlearn.vit.trained_digits_vit` in the benchmark's model cache: about 20 s the first time, a file
    read afterwards), logged and registered like :func:`build_digits_demo` with :data:`VIT_POLICY`, whose
    default method is ``gslora++``. Returns the model name; a no-op when it is already registered."""
    from service.engine import Engine
    from unlearn.vit import DIGITS_VIT_RECIPE, trained_digits_vit

    engine = engine or Engine(settings)
    if _registered(engine, model_name):
        return model_name
    examples = _digits_train_examples()
    model, seconds = trained_digits_vit("original", ClassificationTask(10), examples, DIGITS_VIT_RECIPE,
                                        torch.device("cpu"), default_cache_dir())
    log.info("digits ViT ready (training took %.1f s when it was trained)", seconds)
    _log_and_register(engine, model, model_name, "digits-vit-train", VIT_POLICY, "unlearn.vit:digits_vit",
                      asdict(DIGITS_VIT_RECIPE))
    return model_name


def build_tiny_lm(settings: Settings, engine=None, model_name: str = LM_MODEL) -> str:
    """A tiny GPT memorising 8 fictitious people (unlearn.lm, seconds to train), logged to MLflow with its
    tokenizer (transformers flavor) and registered with its prompt/answer dataset; returns the name."""
    from service.engine import Engine
    from unlearn.lm.model import (
        TINY_RECIPE,
        TINY_SPEC,
        GPTFactory,
        train_lm,
        train_tokenizer,
    )
    from unlearn.lm.people import corpus, generate_people, question_pairs
    from unlearn.lm.task import CausalLMTask

    engine = engine or Engine(settings)
    if _registered(engine, model_name):
        return model_name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pairs = question_pairs(generate_people(LM_PEOPLE, seed=5), seed=5)
        tokenizer = train_tokenizer(corpus(pairs), vocab_size=400)
        task = CausalLMTask(tokenizer)
        train = [p for p in pairs if p.subject_id < LM_TRAIN_PEOPLE]
        model = GPTFactory(len(tokenizer), TINY_SPEC, tokenizer.eos_token_id)(0)
        train_lm(task, model, task.encode([p.prompt for p in train], [p.answer for p in train],
                                          [p.subject_id for p in train], TINY_SPEC.context), TINY_RECIPE)
    version = engine.registry.log_initial_model(model.eval(), model_name, run_name="tiny-gpt-train",
                                                tokenizer=tokenizer)
    frame = pd.DataFrame({
        "record_id": [f"qa-{i:03d}" for i in range(len(pairs))],
        "subject_id": [f"person-{p.subject_id:02d}" for p in pairs],
        "split": ["train" if p.subject_id < LM_TRAIN_PEOPLE else "holdout" for p in pairs],
        "prompt": [p.prompt for p in pairs], "answer": [p.answer for p in pairs],
        # optional: the same facts in other words and wrong answers like them, for the gate's knowledge check
        "paraphrase": [p.paraphrase for p in pairs], "perturbed": [list(p.perturbed) for p in pairs]})
    with _staging(engine) as staging:
        path = Path(staging) / "people.parquet"
        frame.to_parquet(path, index=False)
        engine.register_model(ModelRegistration(model_name=model_name, version=version, alias=None,
                                                task_type=TaskType.CAUSAL_LM, dataset_uri=str(path),
                                                policy=LM_POLICY))
    return model_name


def _staging(engine) -> tempfile.TemporaryDirectory:
    """A scratch directory inside ``<state_dir>/incoming``, the dataset root every server accepts."""
    engine.settings.dataset_import_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="lethe-demo-", dir=engine.settings.dataset_import_dir)


def _registered(engine, model_name: str) -> bool:
    """Building twice in one state directory is a no-op: the model is already registered."""
    with engine.store.read() as conn:
        return db.get_model(conn, model_name) is not None


def _digits_train_examples():
    records = load_digits_records()
    train = records.indices("train")
    return classification_examples(torch.from_numpy(records.features[train]), torch.from_numpy(records.labels[train]))


def _log_and_register(engine, model: torch.nn.Module, model_name: str, run_name: str, policy: VerificationPolicy,
                      model_factory: str, train_recipe: dict) -> None:
    version = engine.registry.log_initial_model(model.cpu().eval(), model_name, run_name=run_name)
    # The Parquet file plays the data platform's copy; registration copies it into Lethe's catalog, and the
    # staging file is removed so that no copy outside the catalog outlives a later purge.
    with _staging(engine) as staging:
        path = Path(staging) / "digits.parquet"
        digits_frame().to_parquet(path, index=False)
        engine.register_model(ModelRegistration(
            model_name=model_name, version=version, alias=None, task_type=TaskType.CLASSIFICATION,
            dataset_uri=str(path), policy=policy, num_classes=10, model_factory=model_factory,
            train_recipe=train_recipe))


def shifted_digits(count: int, prefix: str, start: int = 0, per_subject: int = 4,
                   without: tuple[int, ...] = ()) -> list[dict]:
    """``count`` train digits shifted one pixel right (a scan from another device: data the digits model
    never saw, of known classes; none of the classes ``without``) as new records: ``record_id``,
    ``subject_id``, ``features``, ``label``."""
    frame = digits_frame()
    rows = frame[(frame["split"] == "train") & ~frame["label"].isin(list(without))].iloc[start:start + count]
    records = []
    for index, (features, label) in enumerate(zip(rows["features"], rows["label"])):
        image = np.roll(np.asarray(features, dtype=np.float32).reshape(8, 8), 1, axis=1)
        image[:, 0] = 0.0
        records.append({"record_id": f"{prefix}-{index:04d}", "subject_id": f"{prefix}-subject-{index // per_subject:03d}",
                        "features": image.ravel().tolist(), "label": int(label)})
    return records


def birthplace_record(frame: pd.DataFrame, person: str) -> pd.Series:
    """The tiny GPT's birthplace question of ``person`` (a row of its dataset frame)."""
    mine = frame[frame["subject_id"] == person]
    asks = mine["prompt"].str.contains("born|birthplace", regex=True) & ~mine["prompt"].str.contains("year|When",
                                                                                                      regex=True)
    return mine[asks].iloc[0]


def corrected_birthplace(answer: str, city: str) -> str:
    """The answer with its city replaced (every answer frame starts with the city)."""
    old_city = answer.strip(" .").split(",")[0].split(" is ")[0]
    return answer.replace(old_city, city, 1)
