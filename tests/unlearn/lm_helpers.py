"""A tiny causal-LM problem for the LM tests: 12 fictitious people, a 1-layer GPT that memorises 8 of them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from unlearn.lm.model import TINY_RECIPE, TINY_SPEC, GPTFactory, train_lm, train_tokenizer
from unlearn.lm.people import corpus, generate_people, question_pairs
from unlearn.lm.task import CausalLMTask
from unlearn.registry import UnlearnRequest

SPEC, RECIPE = TINY_SPEC, TINY_RECIPE


@dataclass
class LMProblem:
    task: CausalLMTask
    model: torch.nn.Module
    forget: object
    retain: object
    holdout: object
    pairs: list

    def request(self, seed: int = 0) -> UnlearnRequest:
        return UnlearnRequest(task=self.task, forget=self.forget, retain=self.retain, tune=self.holdout, seed=seed)


@functools.lru_cache(maxsize=1)
def _trained() -> tuple:
    torch.manual_seed(0)
    people = generate_people(12, seed=5)
    pairs = question_pairs(people, seed=5)
    tokenizer = train_tokenizer(corpus(pairs), vocab_size=400)
    task = CausalLMTask(tokenizer)

    everything = task.encode([p.prompt for p in pairs], [p.answer for p in pairs], [p.subject_id for p in pairs], 64)

    def subset(subjects):  # one encoding, so every subset has the same padded width
        return everything.subset([i for i, p in enumerate(pairs) if p.subject_id in subjects])

    forget, retain, holdout = subset({0, 1}), subset({2, 3, 4, 5, 6, 7}), subset({8, 9, 10, 11})
    model = GPTFactory(len(tokenizer), SPEC, tokenizer.eos_token_id)(0)
    train_lm(task, model, forget.concat(retain), RECIPE)
    return task, model, forget, retain, holdout, pairs


def lm_problem() -> LMProblem:
    task, model, forget, retain, holdout, pairs = _trained()
    import copy

    return LMProblem(task, copy.deepcopy(model), forget, retain, holdout, pairs)
