"""The fictitious-people data sets, encoded for the benchmarks' causal LMs, with their people split three ways.

Three LM families (:data:`LM_FAMILIES`, scenario name -> data schema, model shape and recipe):

- ``fictitious-subjects``: biographies (:data:`unlearn.lm.people.PEOPLE_SCHEMA`) and a GPT-2-style model
  (:data:`LM_SPEC`), the family every LM default was tuned on;
- ``fictitious-customers``: customer records (:data:`unlearn.lm.customers.CUSTOMER_SCHEMA`) and a Llama-style
  model of the same size (:data:`CUSTOMER_SPEC`), on which nothing was tuned until ``unseen-kd``'s weights were
  chosen on seeds 0-1 of both families;
- ``fictitious-patients``: a clinic's patient records (:data:`unlearn.lm.patients.PATIENT_SCHEMA`) and a
  GPT-NeoX-style model of the same size (:data:`PATIENT_SPEC`): held out, nothing chosen on it.

Each has :data:`PEOPLE` people (data seed :data:`DATA_SEED`, the same for every benchmark seed), five
questions each (:mod:`unlearn.lm.people`), dealt into disjoint groups:

- ``train`` (:data:`TRAIN_PEOPLE`): what the original GPT is trained on; the benchmark's seed draws the
  forget people among them, the others are the retained people;
- the :data:`NEVER_TRAINED_PEOPLE` others, never trained on, split by a keyed hash of the person's id
  (:func:`unlearn.splits.is_audit` with :data:`unlearn.splits.BENCH_SPLIT_KEY`, as the service splits every
  dataset's never-trained records) into
  - ``tune``: the never-seen people a method may stop or search on (``UnlearnRequest.tune``);
  - ``audit``: the never-seen people only the evaluation sees: the membership attacks' non-members and the
    gate's reference. No method sees them (issue 9: no metric on data a method stopped or searched on).

Whole people, not questions, are split: a person's five questions share a name, so splitting questions
would let a method stop on half a person and be judged on the other half.

Why 100 never-trained people (issue 9's statistical power): the loss attack's AUC of 50 forget questions
against ~220 audit questions has a null standard deviation of ~0.046, so a model that never saw the forget
people lands within 0.5 +- 0.1 about 97% of the time; with the former 20 held-out people (100 questions)
that was ~90%. Never-trained people cost no training time.

The tokenizer is trained on the corpus of everyone once and cached (``<cache>/lm/tokenizer-*.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.customers import CUSTOMER_SCHEMA
from unlearn.lm.metrics import QASplit
from unlearn.lm.model import GPTFactory, GPTSpec, cached_tokenizer
from unlearn.lm.patients import PATIENT_SCHEMA
from unlearn.lm.people import (
    PEOPLE_SCHEMA,
    FactSchema,
    QAPair,
    corpus,
    generate_people,
    question_pairs,
    split_people,
)
from unlearn.lm.task import CausalLMTask
from unlearn.splits import BENCH_SPLIT_KEY, is_audit
from unlearn.training import TrainRecipe

PEOPLE = 200
NEVER_TRAINED_PEOPLE = 100
TRAIN_PEOPLE = PEOPLE - NEVER_TRAINED_PEOPLE
DATA_SEED = 0
VOCAB_SIZE = 1024
LM_SPEC = GPTSpec(layers=2, width=128, heads=4, context=64)
# Memorises 97-100% of the training answers (greedy exact match) in 3-8 minutes on 2 loaded CPU cores.
LM_RECIPE = TrainRecipe(epochs=100, batch_size=16, lr=3e-3, weight_decay=0.0, optimizer="adamw", lr_schedule="linear")
# The second family's model: the same size, another architecture; the same recipe (chosen before any run of
# the family: it memorises the customers' answers as the GPT does the biographies', see docs/results/lm.md).
CUSTOMER_SPEC = GPTSpec(layers=2, width=128, heads=4, context=64, architecture="llama")
# The third, held-out family's model: the same size, a third architecture, the same recipe (fixed before any run).
PATIENT_SPEC = GPTSpec(layers=2, width=128, heads=4, context=64, architecture="neox")


@dataclass(frozen=True)
class LMFamily:
    """One LM benchmark family: its people's schema, its model's shape and the recipe that trains it."""

    schema: FactSchema
    spec: GPTSpec
    recipe: TrainRecipe


def lm_scenario(family: LMFamily) -> str:
    """The one scenario of an LM family of your own: its people are erased as subjects."""
    return f"{family.schema.name}-subject"


LM_FAMILIES = {
    "fictitious-subjects": LMFamily(PEOPLE_SCHEMA, LM_SPEC, LM_RECIPE),
    "fictitious-customers": LMFamily(CUSTOMER_SCHEMA, CUSTOMER_SPEC, LM_RECIPE),
    "fictitious-patients": LMFamily(PATIENT_SCHEMA, PATIENT_SPEC, LM_RECIPE),
}


def person_record_id(subject_id: int) -> str:
    """The id a person is split by (tune or audit): stable, whatever else changes in the data set."""
    return f"person-{subject_id}"


@dataclass(frozen=True)
class FictitiousSubjects:
    tokenizer: PreTrainedTokenizerFast
    task: CausalLMTask
    pairs: tuple[QAPair, ...]
    train_subjects: tuple[int, ...]
    tune_subjects: tuple[int, ...]
    audit_subjects: tuple[int, ...]
    context: int

    @property
    def holdout_subjects(self) -> tuple[int, ...]:
        """Every never-trained person, tune and audit together, in id order (the split before issue 9; the
        continual scenario deals them itself)."""
        return tuple(sorted(self.tune_subjects + self.audit_subjects))

    def pairs_of(self, subjects: Iterable[int]) -> list[QAPair]:
        chosen = set(subjects)
        found = [pair for pair in self.pairs if pair.subject_id in chosen]
        if not found:
            raise InvalidDataError("subject_id", f"no questions about subjects {sorted(chosen)[:5]}...")
        return found

    def examples(self, subjects: Iterable[int]) -> ExampleSet:
        """The trained-on prompt/answer pairs of ``subjects`` (what a model learns or forgets)."""
        pairs = self.pairs_of(subjects)
        return self.task.encode([p.prompt for p in pairs], [p.answer for p in pairs],
                                [p.subject_id for p in pairs], self.context)

    def split(self, subjects: Iterable[int]) -> QASplit:
        pairs = self.pairs_of(subjects)
        prompts, ids = [p.prompt for p in pairs], [p.subject_id for p in pairs]
        encode = lambda answers: self.task.encode(prompts, answers, ids, self.context)
        perturbed = tuple(encode([p.perturbed[j] for p in pairs]) for j in range(len(pairs[0].perturbed)))
        return QASplit(encode([p.answer for p in pairs]), encode([p.paraphrase for p in pairs]), perturbed,
                       tuple(p.answer for p in pairs))


def tune_audit_split(subjects: Iterable[int], key: bytes = BENCH_SPLIT_KEY) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tune, audit): never-trained people dealt by the keyed hash of :func:`person_record_id`."""
    subjects = sorted(subjects)
    audit = tuple(s for s in subjects if is_audit(person_record_id(s), key))
    return tuple(s for s in subjects if s not in set(audit)), audit


def load_fictitious_subjects(cache_dir: Path, people: int = PEOPLE, never_trained: int = NEVER_TRAINED_PEOPLE,
                             data_seed: int = DATA_SEED, context: int = LM_SPEC.context,
                             schema: FactSchema = PEOPLE_SCHEMA) -> FictitiousSubjects:
    everyone = generate_people(people, data_seed, schema)
    train, held = split_people(everyone, never_trained, data_seed)
    tune, audit = tune_audit_split(p.subject_id for p in held)
    if not tune or not audit:
        raise InvalidDataError("people", f"{never_trained} never-trained people gave an empty tune or audit split")
    pairs = question_pairs(everyone, data_seed, schema)
    tokenizer = cached_tokenizer(corpus(pairs), cache_dir / "lm", VOCAB_SIZE)
    return FictitiousSubjects(tokenizer, CausalLMTask(tokenizer), tuple(pairs),
                              tuple(p.subject_id for p in train), tune, audit, context)


def load_family(scenario: str, cache_dir: Path, family: LMFamily | None = None
                ) -> tuple[LMFamily, FictitiousSubjects, GPTFactory]:
    """The family of ``scenario`` (a key of :data:`LM_FAMILIES`, or ``family``, one of your own), its data and
    the factory of its model."""
    family = family or LM_FAMILIES[scenario]
    schema = family.schema
    names = len(set(schema.first_names)) * len(set(schema.last_names))
    if names < PEOPLE:
        raise InvalidDataError("family.schema", f"{schema.name!r} names {names} distinct people (first x last "
                               f"names); the LM benchmark draws {PEOPLE}")
    data = load_fictitious_subjects(cache_dir, context=family.spec.context, schema=family.schema)
    return family, data, GPTFactory(len(data.tokenizer), family.spec, data.tokenizer.eos_token_id)
