"""The causal-LM task adapter: answer-token losses with the prompt masked, greedy generation.

An example is a prompt followed by its answer, tokenised, right-padded to a common length:

- ``input_ids`` [N, L] int64: prompt tokens, answer tokens, the end-of-sequence token, then padding;
- ``attention_mask`` [N, L] int64: 1 on real tokens, 0 on padding;
- ``answer_mask`` [N, L] int64: 1 on the answer tokens (and the closing end-of-sequence token), the
  targets; 0 on prompt tokens and padding. Token t is predicted from the logits at position t - 1, so a
  prompt needs at least one token;
- ``subject_id`` [N] int64: the data subject (person) each example is about.

:meth:`CausalLMTask.per_example_loss` is the NLL SUMMED over answer tokens (``-log pi(y|x)``, as NPO needs
it); :meth:`CausalLMTask.batch_loss` the mean over all answer tokens of the batch (the training
objective); :meth:`CausalLMTask.correct` is teacher-forced exact match (every answer token is the argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import eval_mode

LM_FIELDS = ("input_ids", "attention_mask", "answer_mask")

ANSWER_HEAD_MODEL_TYPES = ("gpt2", "llama", "gpt_neox")
"""``config.model_type`` of the models whose passes run the output layer on the answer-predicting
positions only (:meth:`CausalLMTask.answer_logits`): their logits are the output layer applied to the base
model's last hidden state (its final norm included), nothing after it. Other models' full logits are computed
and selected. ``gpt_neox`` (GPT-NeoX, Pythia) since 2026-12-01: ``embed_out`` of ``gpt_neox``'s output."""


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, from a ``transformers`` tokenizer or a ``tokenizers`` one."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(encoded.ids) if hasattr(encoded, "ids") else list(encoded)


def tokenizer_size(tokenizer) -> int:
    return len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size()


def model_context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        if config is not None and getattr(config, name, None):
            return int(getattr(config, name))
    raise InvalidDataError("model", "the model's config gives no context length (n_positions)")


def model_vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def answer_token_log_probs(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of every next token and the mask of answer targets, both [B, L - 1].

    Position t of the result is token t + 1 predicted from the logits at t (the causal shift).
    """
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), answer_mask[:, 1:].to(log_probs.dtype)


def concat_batches(batches: Sequence[Batch], pad_token_id: int) -> Batch:
    """One batch of several, right-padded to the widest (padding: ``pad_token_id``, masks 0), in order.

    Lets a method forward its forget and retain mini-batches in ONE pass: on a small model the per-call
    overhead dominates, and padding changes no answer token's log-probability (causal attention, padding
    after the last real token, masked out of every loss).
    """
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    out: Batch = {}
    for name in batches[0]:
        parts = []
        for batch in batches:
            tensor = batch[name]
            if tensor.dim() == 2 and tensor.shape[1] < width:
                fill = pad_token_id if name == "input_ids" else 0
                tensor = F.pad(tensor, (0, width - tensor.shape[1]), value=fill)
            parts.append(tensor)
        out[name] = torch.cat(parts)
    return out


def answer_logits(outputs: Tensor, batch: Batch) -> Tensor:
    """The logits that predict the batch's answer tokens, [answer tokens, V], row after row (the causal shift)."""
    return outputs[:, :-1][batch["answer_mask"][:, 1:].bool()]


def _whole(hits: Tensor, mask: Tensor) -> Tensor:
    """Per row: every answer target of ``mask`` [B, L - 1] is a hit (``hits`` [n], the targets in row order)."""
    every = torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
    every[mask] = hits
    return every.all(dim=1)


@dataclass(frozen=True)
class AnswerScores:
    """One pass's scores at a batch's answer targets (:meth:`CausalLMTask.answer_scores`).

    ``logits`` [n, V]: the logits predicting each answer target, row after row (the causal shift: target t + 1
    from position t), and ``log_probs`` their log-softmax; ``targets`` [n] the target tokens; ``mask``
    [B, L - 1] bool: where the targets are; ``target_log_probs`` [B, L - 1]: each target's own log-probability,
    0 at the other positions.
    """

    logits: Tensor
    log_probs: Tensor
    targets: Tensor
    mask: Tensor
    target_log_probs: Tensor

    @property
    def hits(self) -> Tensor:
        """[n] whether each target is the argmax of its logits."""
        return self.logits.argmax(dim=-1) == self.targets

    @property
    def nll(self) -> Tensor:
        """[B] the answer NLL summed per example (:meth:`CausalLMTask.losses_from_outputs`)."""
        return -self.target_log_probs.sum(dim=1)

    @property
    def lengths(self) -> Tensor:
        """[B] answer targets per example (:meth:`CausalLMTask.target_lengths`), as floats."""
        return self.mask.sum(dim=1).to(self.target_log_probs.dtype)

    @property
    def whole(self) -> Tensor:
        """[B] teacher-forced exact match: every answer target is the argmax (:meth:`CausalLMTask.correct`)."""
        return _whole(self.hits, self.mask)

    def leading_log_probs(self, count: int) -> Tensor:
        """The rows of :attr:`log_probs` that belong to the first ``count`` examples."""
        return self.log_probs[: int(self.mask[:count].sum())]


class CausalLMTask:
    """A causal LM (``transformers``-style: ``model(input_ids=..., attention_mask=...).logits``) with its tokenizer.

    tokenizer: a ``transformers`` tokenizer (or a ``tokenizers.Tokenizer``) with an end-of-sequence token,
        used to encode prompt/answer pairs, to build FLAT's template answers and to decode generations.
    eos_token_id: ends every answer and pads; defaults to the tokenizer's ``eos_token_id``.
    """

    name = "causal-lm"
    # Rows per no-grad evaluation pass (unlearn.tasks.eval_batch_size). On the LM benchmark's GPTs (2 threads,
    # 22-token rows) scoring 280 never-seen answers took 160-175 ms at 128 rows against 190-230 at 256, the
    # same numbers to the bit; retained-answer accuracy 235-290 against 255-305.
    eval_batch_size = 128

    def __init__(self, tokenizer, eos_token_id: int | None = None):
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise InvalidDataError("tokenizer", "needs an end-of-sequence token (eos_token_id)")
        self.tokenizer = tokenizer
        self.eos_token_id = int(eos)
        self.vocab_size = tokenizer_size(tokenizer)

    # ---- encoding -------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], answers: Sequence[str], subject_ids: Sequence[int] | None,
               context_length: int, field: str = "examples") -> ExampleSet:
        """Tokenise prompt/answer pairs into an example set; every problem is an :class:`InvalidDataError`.

        Empty prompts or answers, a pair longer than ``context_length`` tokens (answer + end token
        included: it would be truncated) and missing or mismatched ``subject_ids`` are rejected.
        """
        if subject_ids is None:
            raise InvalidDataError(f"{field}.subject_id", "every example needs the id of its data subject")
        if not (len(prompts) == len(answers) == len(subject_ids)):
            raise InvalidDataError(field, f"{len(prompts)} prompts, {len(answers)} answers and "
                                   f"{len(subject_ids)} subject ids: they must match")
        if len(prompts) == 0:
            raise InvalidDataError(field, "is empty")
        sequences = [self._sequence(prompt, answer, index, context_length, field)
                     for index, (prompt, answer) in enumerate(zip(prompts, answers))]
        return self.pack(sequences, torch.as_tensor(list(subject_ids), dtype=torch.long))

    def _sequence(self, prompt: str, answer: str, index: int, context_length: int, field: str) -> tuple[list, int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidDataError(f"{field}.prompt", f"example {index}: the prompt is empty")
        if not isinstance(answer, str) or not answer.strip():
            raise InvalidDataError(f"{field}.answer", f"example {index}: the answer is empty")
        prompt_ids, answer_ids = token_ids(self.tokenizer, prompt), token_ids(self.tokenizer, answer)
        return self._join(prompt_ids, answer_ids, index, context_length, field)

    def _join(self, prompt_ids: list[int], answer_ids: list[int], index: int, context_length: int,
              field: str) -> tuple[list, int]:
        ids = prompt_ids + answer_ids + [self.eos_token_id]
        if len(ids) > context_length:
            raise InvalidDataError(f"{field}.answer", f"example {index}: prompt and answer take {len(ids)} tokens, "
                                   f"more than the model's context of {context_length}")
        return ids, len(prompt_ids)

    def pack(self, sequences: list[tuple[list, int]], subject_id: Tensor) -> ExampleSet:
        """An example set of ``(token ids, prompt length)`` sequences (each ending with its end token),
        right-padded with the end token; ``subject_id`` [N] their subjects."""
        length = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), length), self.eos_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        answer = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer[row, prompt_length : len(ids)] = 1
        return ExampleSet({"input_ids": input_ids, "attention_mask": attention, "answer_mask": answer,
                           "subject_id": subject_id})

    def prompt_ids(self, examples: ExampleSet) -> list[list[int]]:
        """Each example's prompt tokens (real tokens before the first answer token)."""
        result = []
        for ids, answer in zip(examples["input_ids"], examples["answer_mask"]):
            start = int(answer.nonzero()[0]) if answer.any() else int(ids.numel())
            result.append(ids[:start].tolist())
        return result

    def replace_answers(self, examples: ExampleSet, answers: Sequence[str], context_length: int) -> ExampleSet:
        """The same prompts (and subjects) with new answers, e.g. FLAT's template answers."""
        if len(answers) != len(examples):
            raise InvalidDataError("answers", f"{len(answers)} answers for {len(examples)} examples")
        sequences = [self._join(prompt, token_ids(self.tokenizer, answer), index, context_length, "answers")
                     for index, (prompt, answer) in enumerate(zip(self.prompt_ids(examples), answers))]
        subject = examples["subject_id"] if "subject_id" in examples.tensors else torch.zeros(len(examples), dtype=torch.long)
        return self.pack(sequences, subject)

    # ---- the TaskAdapter protocol ----------------------------------------------------------------------
    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def losses_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        log_probs, mask = answer_token_log_probs(outputs, batch["input_ids"], batch["answer_mask"])
        return -(log_probs * mask).sum(dim=1)

    def per_example_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """:meth:`losses_from_outputs` from :meth:`answer_scores` (the output layer on the answer positions)."""
        return self.answer_scores(model, batch).nll

    def target_lengths(self, batch: Batch) -> Tensor:
        return batch["answer_mask"][:, 1:].sum(dim=1).float()

    def batch_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training objective, the mean NLL over every answer token of the batch, from :meth:`answer_scores`
        (the output layer on the answer positions only: the originals the project trains, their retrains and
        the unlearning methods' passes all pay the same for it)."""
        scores = self.answer_scores(model, batch)
        return -scores.target_log_probs.sum() / scores.mask.sum()

    def output_energy(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean over the batch of the squared L2 norm of the logits at the answer-predicting positions."""
        logits = self.outputs(model, batch)[:, :-1]
        mask = batch["answer_mask"][:, 1:].to(logits.dtype)
        return (logits.pow(2).sum(dim=-1) * mask).sum(dim=1).mean()

    def correct(self, model: nn.Module, batch: Batch) -> Tensor:
        """Teacher-forced exact match: every answer token (and the end token) is the argmax.

        From :meth:`answer_logits` (the output layer on the answer-predicting positions only): the same
        verdicts as :meth:`correct_from_outputs` on the full outputs."""
        logits, mask = self.answer_logits(model, batch)
        return _whole(logits.argmax(dim=-1) == batch["input_ids"][:, 1:][mask], mask)

    def correct_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        logits = outputs[:, :-1]
        hits = logits.argmax(dim=-1) == batch["input_ids"][:, 1:]
        mask = batch["answer_mask"][:, 1:].bool()
        return (hits | ~mask).all(dim=1)

    def answer_logits(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """The logits that predict the answer targets, [n, V] row after row, and the targets' mask [B, L - 1] (bool).

        For the model types of :data:`ANSWER_HEAD_MODEL_TYPES` the output layer runs on those positions only,
        for a fraction of the cost (the answers are about a quarter of the positions of the LM benchmark's
        rows), with the same values to the bit as selecting them from :meth:`outputs` on the three architectures
        (test ``test_evaluation_passes_on_the_answer_positions_give_the_full_outputs_numbers_to_the_bit``).
        On the benchmark's GPT (2 threads) scoring the 280 never-seen answers took 0.18-0.19 s instead of
        0.25-0.27 s, and the 1,080 rows of the gate's paraphrase probe 0.60 s instead of 0.67 s. Other models:
        the full outputs, selected. Evaluation passes go through it, and, through :meth:`answer_scores`, the
        training loss (:meth:`batch_loss`: the originals the project trains and their retrains) and the passes of
        ``unseen-kd`` and ``simnpo+rt``; FLAT and continual fine-tuning keep :meth:`outputs`. The gradients
        differ from the full outputs' in the last bits (:data:`unlearn.lm.model.LM_TRAINING_CODE_VERSION`).
        """
        mask = batch["answer_mask"][:, 1:].bool()
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) in ANSWER_HEAD_MODEL_TYPES:
            hidden = model.base_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
            return model.get_output_embeddings()(hidden[:, :-1][mask]), mask
        return answer_logits(self.outputs(model, batch), batch), mask

    def answer_log_probs(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """:func:`answer_token_log_probs` of the model on ``batch`` at the answer targets, from
        :meth:`answer_logits`: log-probabilities [B, L - 1] (0 at the other positions, which every user masks
        out) and the answer-target mask [B, L - 1] as floats."""
        scores = self.answer_scores(model, batch)
        return scores.target_log_probs, scores.mask.to(scores.target_log_probs.dtype)

    def eval_losses_and_correct(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """:meth:`losses_from_outputs` and :meth:`correct_from_outputs` of one evaluation pass, from
        :meth:`answer_logits` (:func:`unlearn.tasks.eval_losses_and_correct` reads it)."""
        scores = self.answer_scores(model, batch)
        return scores.nll, scores.whole

    def answer_scores(self, model: nn.Module, batch: Batch) -> AnswerScores:
        """One pass of ``model`` on ``batch`` scored at the answer targets only (:meth:`answer_logits`):
        evaluation passes, the training loss and the passes of ``unseen-kd`` and ``simnpo+rt`` (gradients flow
        through :attr:`AnswerScores.log_probs` and :attr:`AnswerScores.target_log_probs`)."""
        logits, mask = self.answer_logits(model, batch)
        targets = batch["input_ids"][:, 1:][mask]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        values = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        target_log_probs = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        target_log_probs = target_log_probs.masked_scatter(mask, values)
        return AnswerScores(logits, log_probs, targets, mask, target_log_probs)

    def validate(self, model: nn.Module, examples: ExampleSet, field: str) -> None:
        """Examples must be non-empty LM examples with an answer, fit the context, and use the model's vocabulary.

        The tokenizer must not be larger than the model's embedding table (it may be smaller: models pad
        their embeddings); token ids must lie below the model's vocabulary size.
        """
        if len(examples) == 0:
            raise InvalidDataError(field, "is empty")
        for name in (*LM_FIELDS, "subject_id"):
            if name not in examples.tensors:
                raise InvalidDataError(f"{field}.{name}", f"missing tensor {name!r}")
        input_ids, attention, answer = (examples[name] for name in LM_FIELDS)
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InvalidDataError(f"{field}.input_ids", "must be a 2-D int64 tensor")
        if attention.shape != input_ids.shape or answer.shape != input_ids.shape:
            raise InvalidDataError(field, "input_ids, attention_mask and answer_mask must have the same shape")
        vocab = model_vocab_size(model)
        if self.vocab_size > vocab:
            raise InvalidDataError("tokenizer", f"the tokenizer has {self.vocab_size} tokens, the model's embedding "
                                   f"only {vocab}: they do not belong together")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InvalidDataError(f"{field}.input_ids", f"token ids must lie in [0, {vocab})")
        context = model_context_length(model)
        if input_ids.shape[1] > context:
            raise InvalidDataError(f"{field}.answer", f"sequences of {input_ids.shape[1]} tokens exceed the "
                                   f"model's context of {context}")
        answer_counts = answer[:, 1:].sum(dim=1)
        if bool((answer_counts == 0).any()):
            raise InvalidDataError(f"{field}.answer", f"{int((answer_counts == 0).sum())} examples have no answer "
                                   "token after a prompt token")
        if bool((answer[:, 0] != 0).any()):
            raise InvalidDataError(f"{field}.prompt", "every example needs at least one prompt token")
        if bool(((answer == 1) & (attention == 0)).any()):
            raise InvalidDataError(f"{field}.answer_mask", "answer tokens must be real (attended) tokens")

    # ---- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: nn.Module, examples: ExampleSet, max_new_tokens: int, batch_size: int = 128) -> list[str]:
        """Greedy answers to each example's prompt, decoded, without the end token (eval mode; mode restored).

        Prompts of equal length are batched together, so no padding enters a forward pass.
        """
        device = next(iter(model.parameters())).device
        prompts = self.prompt_ids(examples)
        context = model_context_length(model)
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        outputs: list[list[int]] = [[] for _ in prompts]
        with eval_mode(model):
            for length, indices in by_length.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    ids = torch.tensor([prompts[i] for i in chunk], device=device)
                    done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                    for _ in range(min(max_new_tokens, context - length)):
                        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                        next_ids = logits[:, -1].argmax(dim=-1)
                        for row, token in enumerate(next_ids.tolist()):
                            if not done[row] and token != self.eos_token_id:
                                outputs[chunk[row]].append(token)
                        done |= next_ids == self.eos_token_id
                        if bool(done.all()):
                            break
                        ids = torch.cat([ids, next_ids.unsqueeze(1)], dim=1)
        return [self.tokenizer.decode(tokens) for tokens in outputs]
