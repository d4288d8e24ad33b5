"""The fictitious-subjects data set, encoded for the benchmark's GPT.

:data:`PEOPLE` people (data seed :data:`DATA_SEED`, the same for every benchmark seed), of whom
:data:`HOLDOUT_PEOPLE` are never trained on; five questions per person (:mod:`unlearn.lm.people`).
The tokenizer is trained on the corpus once and cached (``<cache>/lm/tokenizer-*.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.metrics import QASplit
from unlearn.lm.model import GPTSpec, cached_tokenizer
from unlearn.lm.people import (
    QAPair,
    corpus,
    generate_people,
    question_pairs,
    split_people,
)
from unlearn.lm.task import CausalLMTask
from unlearn.training import TrainRecipe

PEOPLE = 120
HOLDOUT_PEOPLE = 20
DATA_SEED = 0
VOCAB_SIZE = 1024
LM_SPEC = GPTSpec(layers=2, width=128, heads=4, context=64)
# Memorises 97-100% of the training answers (greedy exact match, seeds 0-2) in 3-8 minutes on 2 loaded CPU cores.
LM_RECIPE = TrainRecipe(epochs=100, batch_size=16, lr=3e-3, weight_decay=0.0, optimizer="adamw")


@dataclass(frozen=True)
class FictitiousSubjects:
    tokenizer: PreTrainedTokenizerFast
    task: CausalLMTask
    pairs: tuple[QAPair, ...]
    train_subjects: tuple[int, ...]
    holdout_subjects: tuple[int, ...]
    context: int

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


def load_fictitious_subjects(cache_dir: Path, people: int = PEOPLE, holdout: int = HOLDOUT_PEOPLE,
                             data_seed: int = DATA_SEED, context: int = LM_SPEC.context) -> FictitiousSubjects:
    everyone = generate_people(people, data_seed)
    train, held = split_people(everyone, holdout, data_seed)
    pairs = question_pairs(everyone, data_seed)
    tokenizer = cached_tokenizer(corpus(pairs), cache_dir / "lm", VOCAB_SIZE)
    return FictitiousSubjects(tokenizer, CausalLMTask(tokenizer), tuple(pairs),
                              tuple(p.subject_id for p in train), tuple(p.subject_id for p in held), context)
