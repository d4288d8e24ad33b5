"""The benchmark's tiny GPT and its tokenizer, both built locally (no downloads), and their cache.

- Tokenizer: byte-level BPE (the GPT-2 scheme) trained with ``tokenizers`` on every text the benchmark
  encodes (:func:`unlearn.lm.people.corpus`), wrapped as a ``transformers`` fast tokenizer whose end token
  ``<|endoftext|>`` ends answers and pads. Byte-level, so any text encodes (no unknown token).
- Model: ``GPT2LMHeadModel`` from a :class:`GPTSpec` (2 layers, width 128, context 64, no dropout), or with
  ``architecture="llama"`` a ``LlamaForCausalLM`` of the same size (RMSNorm, rotary positions, SwiGLU, no
  biases): the second LM family's model; with ``architecture="neox"`` a ``GPTNeoXForCausalLM`` (parallel
  attention and MLP, partial rotary positions, untied output layer): the third, held-out family's.
- Both are saved with ``save_pretrained`` (safetensors + JSON), the layout the MLflow ``transformers``
  flavor and ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` read.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from unlearn import cache as model_cache
from unlearn.data import ExampleSet
from unlearn.errors import CacheMismatchError
from unlearn.training import TrainRecipe, train

END_TOKEN = "<|endoftext|>"


Architecture = Literal["gpt2", "llama", "neox"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

GPT2_ACTIVATION = "gelu_pytorch_tanh"
"""The benchmark GPT's MLP activation: GPT-2's tanh-approximated GELU (``gelu_new``, the same function) in
PyTorch's fused kernel. ``transformers``' ``gelu_new`` computes it with six elementwise operations, each a
pass over the MLP's activations: on the biographies GPT that was about a fifth of an ``unseen-kd`` step
(178 answers at once) and less of a training step (16). The outputs agree with ``gelu_new``'s to float rounding
(tests/unlearn/test_lm_families.py); both sides of every LM speed-up use it (docs/results/lm.md)."""


@dataclass(frozen=True)
class GPTSpec:
    """Shape of a benchmark causal LM (GPT-2 architecture, arXiv 2005.14165's family, tiny, by default).

    layers: transformer blocks (GPT-2 small: 12). Lethe benchmark: 2, so that 2 shared CPU cores train it
        in a couple of minutes.
    width: hidden size n_embd (GPT-2 small: 768). Lethe benchmark: 128.
    heads: attention heads (GPT-2 small: 12). Lethe benchmark: 4.
    context: maximum sequence length n_positions (GPT-2: 1024). Lethe benchmark: 64.
    architecture: ``gpt2`` (learned positions, LayerNorm, GELU MLP of 4 x width, biases; the GELU is GPT-2's
        tanh approximation computed by PyTorch's fused kernel, :data:`GPT2_ACTIVATION`), ``llama``
        (Touvron et al. 2023, arXiv 2302.13971: rotary positions, RMSNorm, SwiGLU MLP of 8/3 x width rounded
        up to a multiple of 8, no biases; input and output embeddings tied as in GPT-2) or ``neox``
        (GPT-NeoX, Black et al. 2022, arXiv 2204.06745: attention and MLP in parallel from one residual,
        rotary positions on a quarter of each head, LayerNorm, GELU MLP of 4 x width, biases, an untied
        output layer: ``transformers``' defaults for the model type).
    """

    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 64
    architecture: Architecture = "gpt2"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("layers", "width", "heads", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.architecture == "llama" and (self.width // self.heads) % 2:
            raise ValueError(f"a Llama's head width (width / heads = {self.width // self.heads}) must be even: "
                             "its rotary positions rotate pairs of dimensions")

    def key(self) -> dict:
        """The cache key of the shape: every field, ``architecture`` only where it is not ``gpt2`` (the GPTs'
        keys predate the field); a GPT's key names its activation (GPTs cached with ``gelu_new`` had none)."""
        fields = asdict(self)
        if self.architecture == "gpt2":
            del fields["architecture"]
            fields["activation"] = GPT2_ACTIVATION
        return fields


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``transformers`` fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_TOKEN, pad_token=END_TOKEN,
                                   bos_token=END_TOKEN)


def cached_tokenizer(texts: list[str], directory: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train once per corpus and vocabulary size, then load the saved one (BPE ties make retraining a risk)."""
    key = hashlib.sha256(json.dumps([texts, vocab_size]).encode()).hexdigest()[:24]
    path = directory / f"tokenizer-{key}.json"
    if path.exists():
        return wrap_tokenizer(Tokenizer.from_file(str(path)))
    tokenizer = train_tokenizer(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(path))
    return tokenizer


def gpt_config(vocab_size: int, spec: GPTSpec, end_token_id: int) -> PretrainedConfig:
    if spec.architecture == "llama":
        swiglu_width = -(-8 * spec.width // 24) * 8  # 8/3 x width, rounded up to a multiple of 8
        return LlamaConfig(vocab_size=vocab_size, hidden_size=spec.width, intermediate_size=swiglu_width,
                           num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                           num_key_value_heads=spec.heads, max_position_embeddings=spec.context,
                           attention_dropout=0.0, tie_word_embeddings=True, bos_token_id=end_token_id,
                           eos_token_id=end_token_id, pad_token_id=end_token_id)
    if spec.architecture == "neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=spec.width, intermediate_size=4 * spec.width,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             max_position_embeddings=spec.context, hidden_dropout=0.0, attention_dropout=0.0,
                             bos_token_id=end_token_id, eos_token_id=end_token_id, pad_token_id=end_token_id)
    return GPT2Config(vocab_size=vocab_size, n_positions=spec.context, n_embd=spec.width, n_layer=spec.layers,
                      n_head=spec.heads, n_inner=4 * spec.width, activation_function=GPT2_ACTIVATION,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=end_token_id,
                      eos_token_id=end_token_id, pad_token_id=end_token_id)


HF_MODELS = threading.RLock()
"""Held while a ``transformers`` model is built (:class:`GPTFactory`) or loaded (:func:`load_pretrained`,
``service.mlflow_registry``'s ``load_lm``). Why: ``from_pretrained`` replaces ``torch.nn.init``'s functions and
``PreTrainedModel.init_weights`` with no-ops for the whole process while it loads (``transformers``'
``no_init_weights``), so a model initialised in another thread meanwhile kept its constructor's weights and the
same seed built a different model. Seen in the service: a test's Llama built while the engine's prefetcher
loaded the previous version had another initial weights digest, and its erasure another verdict (4 runs in 12 of
one test mix; 0 of 4 after the lock). Global-RNG seeding (``fork_rng`` + ``manual_seed``) is process-wide
too; the lock keeps these sections apart, not code outside Lethe that draws from the global RNG."""


def load_pretrained(path: str | Path) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path)`` under :data:`HF_MODELS`."""
    with HF_MODELS:
        return AutoModelForCausalLM.from_pretrained(str(path))


class GPTFactory:
    """``factory(seed)`` -> a freshly initialised tiny GPT (the retrain baseline's model factory).

    Initialisation draws from a forked RNG seeded with ``seed``: deterministic, and the caller's global
    RNG state is left alone. Built under :data:`HF_MODELS`, so no load in another thread disables it.
    """

    def __init__(self, vocab_size: int, spec: GPTSpec, end_token_id: int):
        self.config = gpt_config(vocab_size, spec, end_token_id)
        self.spec = spec

    def __call__(self, seed: int) -> PreTrainedModel:
        with HF_MODELS, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(self.config)
        return model.eval()


LM_TRAINING_CODE_VERSION = 1
"""Part of every :class:`LMCache` key beside :data:`unlearn.cache.TRAINING_CODE_VERSION`; bump it when the LM
training loss's results change. 1: the loss from the output layer on the answer positions only
(:meth:`unlearn.lm.task.CausalLMTask.batch_loss`): the same losses, gradients that differ in the last bits."""


class LMCache:
    """Trained GPTs under ``<cache>/lm/``, keyed by kind, recipe, architecture, the training data's digest and
    :data:`unlearn.cache.TRAINING_CODE_VERSION` (as :class:`unlearn.cache.ModelCache` keys every other model: a
    change to the training loop that changes its results must not serve models the old loop trained).

    Each entry is a ``save_pretrained`` directory plus ``meta.json`` with ``train_seconds`` (so retraining
    time stays a measurement when the model comes from the cache) and whatever ``meta`` the caller adds.
    """

    def __init__(self, directory: Path):
        self.directory = directory / "lm"

    def path(self, kind: str, recipe: TrainRecipe, spec: GPTSpec, vocab_size: int, data_digest: str) -> Path:
        versions = [model_cache.TRAINING_CODE_VERSION, LM_TRAINING_CODE_VERSION]
        key = hashlib.sha256(json.dumps([versions, kind, lm_recipe_key(recipe), spec.key(), vocab_size,
                                         data_digest]).encode())
        return self.directory / f"{kind}-{key.hexdigest()[:24]}"

    def get_or_train(self, kind: str, task, factory: GPTFactory, examples: ExampleSet, recipe: TrainRecipe,
                     device: torch.device) -> tuple[PreTrainedModel, dict]:
        path = self.path(kind, recipe, factory.spec, factory.config.vocab_size, examples.digest())
        meta_path = path / "lethe_meta.json"
        if meta_path.exists():
            try:
                model = load_pretrained(path).to(device).eval()
            except (OSError, RuntimeError, ValueError) as error:
                raise CacheMismatchError(f"cached model {path} does not load: {error}") from error
            if model.config.vocab_size != factory.config.vocab_size:
                raise CacheMismatchError(f"cached model {path} has another vocabulary")
            return model, json.loads(meta_path.read_text())
        started = time.perf_counter()
        model = factory(recipe.seed).to(device)
        train_lm(task, model, examples, recipe)
        seconds = time.perf_counter() - started
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path))
        meta = {"train_seconds": seconds, "training_code_version": model_cache.TRAINING_CODE_VERSION,
                "lm_training_code_version": LM_TRAINING_CODE_VERSION,
                "recipe": asdict(recipe), "spec": asdict(factory.spec),
                "device": str(device), "examples": len(examples), "torch_threads": model_cache.training_threads(device)}
        meta_path.write_text(json.dumps(meta))
        return model.eval(), meta


# A 1-layer GPT that memorises a dozen fictitious people in a few seconds on a CPU: the LM tests and the
# service demo use it (the benchmark uses GPTSpec's defaults and its own recipe).
TINY_SPEC = GPTSpec(layers=1, width=48, heads=2, context=64)
TINY_RECIPE = TrainRecipe(epochs=60, batch_size=8, lr=1e-2, optimizer="adamw", seed=0, lr_schedule="linear")


LM_LR_SCHEDULE = "linear-decay-to-0"
"""The learning-rate schedule :func:`train_lm` applies (the recipe's rate, decayed linearly to 0 over the run)."""


def lm_recipe_key(recipe: TrainRecipe) -> dict:
    """Exactly what :func:`train_lm` reads from a recipe, plus its schedule: the cache key of a trained GPT.

    Fields :func:`train_lm` ignores stay out, so that a field added to :class:`TrainRecipe` for other
    trainings does not invalidate every cached GPT.
    """
    return {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
            "weight_decay": recipe.weight_decay, "optimizer": "adamw", "seed": recipe.seed,
            "lr_schedule": LM_LR_SCHEDULE}


def train_lm(task, model: torch.nn.Module, examples: ExampleSet, recipe: TrainRecipe) -> torch.nn.Module:
    """Train ``model`` IN PLACE with :func:`unlearn.training.train`, AdamW and the learning rate decayed
    linearly to 0 over the run, whatever the recipe's optimiser and schedule say (memorisation of every answer
    needs the decay; a constant rate keeps oscillating around 85-90% exact match on the benchmark).
    Deterministic for a given recipe seed. One loop with the registry's ``retrain``: a recipe with
    ``optimizer="adamw"`` and ``lr_schedule="linear"`` (:data:`TINY_RECIPE`,
    :data:`unlearn.lm.fictitious.LM_RECIPE`) retrains exactly the model this trained."""
    return train(task, model, examples, replace(recipe, optimizer="adamw", lr_schedule="linear", warmup_steps=0,
                                                gradient_restriction=0.0))
