"""A small vision transformer for the digits, built from a config (nothing is downloaded), and its cache.

``DigitsViT`` wraps a transformers ``ViTForImageClassification`` so that it fits
:class:`~unlearn.tasks.ClassificationTask`: flat ``[batch, 64]`` inputs in ``[0, 1]`` (the format of
:mod:`unlearn.digits`) are reshaped to one 8x8 channel, upsampled bilinearly when ``image_size`` > 8, and
cut into square patches; ``forward`` returns plain logits. It also exposes the two halves
of the forward pass that GS-LoRA++ needs:

- ``embed(inputs)``: the normalised CLS feature, i.e. the CLS token after the ViT's final LayerNorm (the
  head's input; METHODS.md "the normalised CLS feature, not logits");
- ``classify(embedding)``: the linear head on that feature.

``forward(x) == classify(embed(x))`` exactly, so a method may train on embeddings and logits with one pass.

Size (``DIGITS_VIT``): hidden 128, 4 blocks, 4 heads, MLP 256, about 534k parameters; the 8x8 digit is cut
into four 4x4 patches (4 patch tokens + CLS). The width is chosen so that rank-8 LoRA on both FFN linears of
every block is 4.6% of the model (issue 6 asks for <= 5%: a block's LoRA share of its FFN is r/d + r/m, so a
hidden size of 64 would give about 9%). No upsampling by default: 16x16 bilinear upsampling with 4x4 patches
(17 tokens) cost 2.3x the time per step on our 2-core CPU and trained no better (91% vs 96% test accuracy
after 30 epochs at lr 1e-3); ``image_size=16`` keeps that variant available. No dropout.

Training uses the library's own loop (:func:`unlearn.training.train`) with ``DIGITS_VIT_RECIPE``, so the
``retrain`` baseline repeats it exactly. :func:`trained_digits_vit` caches trained weights in the package's
one model cache (:mod:`unlearn.cache`), keyed by the recipe, the architecture and the training data's digest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification

from unlearn.data import ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe


@dataclass(frozen=True)
class DigitsViTConfig:
    """Architecture of the digits ViT (a transformers ``ViTConfig`` is built from it).

    image_size: side of the square image fed to the patch embedding (8 = the digits as they are; larger
        values upsample bilinearly).
    patch_size: side of a square patch; (image_size / patch_size)^2 patches plus one CLS token.
    hidden_size: token width d.
    num_layers: transformer blocks.
    num_heads: attention heads (must divide hidden_size).
    mlp_size: FFN inner width m (fc1: d -> m, fc2: m -> d).
    num_classes: logits.
    """

    image_size: int = 8
    patch_size: int = 4
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_size: int = 256
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads or min(asdict(self).values()) < 1:
            raise InvalidParameterError("vit_config", f"inconsistent ViT configuration {self}")


DIGITS_VIT = DigitsViTConfig()
# AdamW, 20 epochs of batch 32 over the 1,168 training digits, lr 5e-4 with weight decay 0.05 (lr 1e-3
# oscillated by +-3 points between epochs), decayed linearly to 0. At a constant lr (the recipe until 2026-12-01;
# docs/results/gslora.md) the model stopped wherever the last epoch left it: trained at two threads, seed 1's
# original reached 93.2% training accuracy and seed 2's vit-subject retrain 92.8% (98.4-100% elsewhere), so a
# method that kept seed 1's original shipped it 3.7-4.0 points below the retrained model. With the decay, seeds
# 0-2 at two threads reach 99.9-100% training accuracy, originals and class-3 retrains alike (docs/benchmarks.md,
# "The ViT recipe decays its learning rate").
DIGITS_VIT_RECIPE = TrainRecipe(epochs=20, batch_size=32, lr=5e-4, weight_decay=0.05, optimizer="adamw",
                                lr_schedule="linear")


class DigitsViT(nn.Module):
    """``ViTForImageClassification`` on flat 8x8 digits; ``forward`` returns logits ``[batch, classes]``."""

    def __init__(self, config: DigitsViTConfig = DIGITS_VIT):
        super().__init__()
        self.architecture = config
        vit_config = ViTConfig(
            image_size=config.image_size, patch_size=config.patch_size, num_channels=1,
            hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=config.mlp_size,
            num_labels=config.num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTForImageClassification(vit_config)

    def images(self, inputs: Tensor) -> Tensor:
        """Flat [B, 64] -> [B, 1, S, S]: the 8x8 grid, bilinearly upsampled when S > 8 (Resize in ONNX)."""
        grid = inputs.reshape(-1, 1, 8, 8)
        size = self.architecture.image_size
        if size == 8:
            return grid
        return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)

    def embed(self, inputs: Tensor) -> Tensor:
        """The CLS token after the final LayerNorm: the head's input, GS-LoRA++'s "normalised CLS feature"."""
        hidden = self.vit.vit(pixel_values=self.images(inputs)).last_hidden_state
        return hidden[:, 0, :]

    def classify(self, embedding: Tensor) -> Tensor:
        return self.vit.classifier(embedding)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classify(self.embed(inputs))


def digits_vit(seed: int, config: DigitsViTConfig = DIGITS_VIT) -> DigitsViT:
    """Factory with seeded initialisation (the retrain baseline calls it with the recipe's seed)."""
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        return DigitsViT(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trained_digits_vit(
    kind: str,
    task: TaskAdapter,
    examples: ExampleSet,
    recipe: TrainRecipe,
    device: torch.device,
    cache_dir: Path,
    config: DigitsViTConfig = DIGITS_VIT,
) -> tuple[DigitsViT, float]:
    """A ViT trained from ``digits_vit(recipe.seed)`` on ``examples`` through :class:`unlearn.cache.ModelCache`,
    and the seconds its training took WHEN IT WAS TRAINED (informational: never divide by it; a benchmark
    times its own retrain in process, :mod:`unlearn.bench.timing`).

    ``kind`` labels the entry (``original``, ``retrained``); the key is recipe + architecture + data.
    """
    from unlearn.cache import ModelCache

    entry = ModelCache(cache_dir).trained("digits-vit", task, lambda seed: digits_vit(seed, config), examples,
                                          recipe, device, kind, {"vit": asdict(config)})
    return entry.model, float(entry.meta["train_seconds"])
