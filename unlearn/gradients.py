"""Small shared pieces of the gradient-based unlearning methods (GA, GradDiff, NPO, IAU and the GU wrapper).

Each method keeps its own loop; what they share is here, each piece tested on its own:

- flat gradients: :func:`flat_gradient`, :func:`write_gradient`, :func:`mean_objective_gradient`;
- data: :func:`batch_stream`, an endless, seeded, reshuffling stream of mini-batches;
- the optimiser of an unlearning run: :func:`make_unlearning_optimizer` (Adam or plain SGD, no momentum);
- GU's geometry (Geometric-disentanglement Unlearning, arXiv 2511.17100): :func:`orthonormal_basis`,
  :func:`project_out`, :func:`adam_whitening` and :func:`gu_direction`.

Flat vectors: a model's trainable parameters (``requires_grad``), in ``named_parameters()`` order,
concatenated. A *block* is a slice of that vector; GU builds one basis per block, either one block for the
whole network (``scope="global"``) or one per parameter tensor (``scope="per-tensor"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.tasks import TaskAdapter

BasisScope = Literal["global", "per-tensor"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an unlearning run may change, in ``named_parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_gradient(objective: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """Gradient of a scalar ``objective`` with respect to ``params`` as one flat vector (zeros where unused)."""
    grads = torch.autograd.grad(objective, list(params), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def write_gradient(params: Sequence[nn.Parameter], vector: Tensor) -> None:
    """Set ``p.grad`` of every parameter from a flat vector (what the optimiser's next step will use)."""
    offset = 0
    for p in params:
        count = p.numel()
        p.grad = vector[offset : offset + count].view_as(p).clone()
        offset += count
    if offset != vector.numel():
        raise ValueError(f"gradient vector has {vector.numel()} entries, parameters {offset}")


def parameter_vector(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def mean_objective_gradient(task: TaskAdapter, model: nn.Module, examples: ExampleSet, batch_size: int,
                            params: Sequence[nn.Parameter]) -> Tensor:
    """Flat gradient of the mean training objective over ALL of ``examples`` (a full-batch mean).

    Each mini-batch's ``task.batch_loss`` (a batch mean) is weighted by its share of the examples, so the
    result does not depend on ``batch_size`` for classification. The model's mode is left as it is.
    """
    device = next(iter(model.parameters())).device
    total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
    count = len(examples)
    for batch in examples.batches(batch_size, device):
        share = next(iter(batch.values())).shape[0] / count
        total += share * flat_gradient(task.batch_loss(model, batch), params)
    return total


def batch_stream(examples: ExampleSet, batch_size: int, device: torch.device,
                 generator: torch.Generator) -> Iterator[Batch]:
    """Mini-batches forever: one shuffled pass after another, the order drawn from ``generator``."""
    while True:
        yield from examples.batches(batch_size, device, shuffle_generator=generator)


def make_unlearning_optimizer(name: str, params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``adam`` (torch defaults: betas 0.9/0.999, eps 1e-8, no weight decay) or ``sgd`` (plain, no momentum).

    Plain SGD makes the update exactly ``-lr * p.grad``, which is what GU's Euclidean guarantee needs.
    """
    if name == "adam":
        return torch.optim.Adam(list(params), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(list(params), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


# ---------------------------------------------------------------------------------------------------------
# GU: Geometric-disentanglement Unlearning (arXiv 2511.17100)
# ---------------------------------------------------------------------------------------------------------


def parameter_blocks(params: Sequence[nn.Parameter], scope: BasisScope) -> list[slice]:
    """Slices of the flat parameter vector that get their own basis."""
    sizes = [p.numel() for p in params]
    if scope == "global":
        return [slice(0, sum(sizes))]
    if scope == "per-tensor":
        blocks, offset = [], 0
        for size in sizes:
            blocks.append(slice(offset, offset + size))
            offset += size
        return blocks
    raise ValueError(f"unknown basis scope {scope!r}")


def orthonormal_basis(candidates: Tensor, rank: int, tolerance: float = 1e-6) -> Tensor:
    """Orthonormal columns spanning up to ``rank`` of the candidate directions (rows of ``candidates``).

    Gram-Schmidt in the candidates' order, with a second orthogonalisation pass for numerical stability.
    Each candidate is first scaled to unit norm; it joins the basis while the norm of what is left after
    removing the current basis exceeds ``tolerance`` (so the test is scale-free: tiny gradients of a
    converged model are as usable as large ones). Returns a ``[dimension, r]`` matrix, ``r <= rank``.
    """
    dimension = candidates.shape[1]
    columns: list[Tensor] = []
    for candidate in candidates:
        if len(columns) >= rank:
            break
        norm = candidate.norm()
        if not torch.isfinite(norm) or norm == 0:
            continue
        residual = candidate / norm
        for _ in range(2):  # "twice is enough" (Kahan/Parlett) for orthogonality to working precision
            for column in columns:
                residual = residual - (column @ residual) * column
        residual_norm = residual.norm()
        if residual_norm > tolerance:
            columns.append(residual / residual_norm)
    if not columns:
        return candidates.new_zeros(dimension, 0)
    return torch.stack(columns, dim=1)


def project_out(basis: Tensor, vector: Tensor) -> Tensor:
    """``vector - U U^T vector``: the part of ``vector`` orthogonal to the orthonormal columns of ``basis``."""
    if basis.shape[1] == 0:
        return vector.clone()
    return vector - basis @ (basis.T @ vector)


def adam_whitening(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                   first_step_gradient: Tensor) -> Tensor:
    """GU's whitening ``S = diag((sqrt(v_hat) + eps)^(-1/2))`` for Adam's metric, as a flat vector.

    Adam moves ``theta`` by about ``-lr * P g`` with ``P = diag(1 / (sqrt(v_hat) + eps))`` = ``S^2``, so two
    directions are orthogonal in Adam's metric when ``(S a)^T (S b) = 0``. ``v_hat`` is Adam's bias-corrected
    second moment. Before Adam's first step it has none; then ``v_hat`` is taken as
    ``first_step_gradient ** 2``, which is what Adam's own ``v_hat`` is after one step on that gradient.
    """
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    pieces = []
    offset = 0
    for p in params:
        count = p.numel()
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].reshape(-1) / (1.0 - beta2**step)
        else:
            v_hat = first_step_gradient[offset : offset + count].pow(2)
        pieces.append((v_hat.sqrt() + eps).rsqrt())
        offset += count
    return torch.cat(pieces)


@dataclass(frozen=True)
class JointRule:
    """GU's joint forget/retain rule (arXiv 2511.17100); see :func:`gu_direction`.

    tau: a tangent component i of the forget update is kept when ``a_i * b_i > tau``.
    tangent_cap: the kept tangent part is scaled down to at most ``tangent_cap * ||z_f_perp||``.
    beta_rep: weight of the added retain tangent part ``beta_rep * Q Q^T z_r``.
    """

    tau: float
    tangent_cap: float
    beta_rep: float


@dataclass(frozen=True)
class Projection:
    """A projected forget direction and what the projection removed, for reporting."""

    direction: Tensor
    rank: int  # smallest basis rank over blocks
    removed_fraction: float  # ||U U^T z_f||^2 / ||z_f||^2 over all blocks (0: already orthogonal)


def gu_direction(forget_gradient: Tensor, retain_gradients: Tensor, blocks: Sequence[slice], rank: int,
                 tolerance: float = 1e-6, whitening: Tensor | None = None,
                 joint: JointRule | None = None) -> Projection:
    """The GU forget direction: ``forget_gradient`` without its component in the span of retain gradients.

    forget_gradient: flat gradient g_f of the base method's forget objective (the optimiser DESCENDS it).
    retain_gradients: ``[k, n]`` raw retain-batch gradients g_r,i spanning the protected subspace.
    whitening: Adam's ``S`` (:func:`adam_whitening`) or None for the Euclidean metric (S = I).

    Per block: ``z_f = S g_f``, ``Q = orthonormal_basis(S G_r)``, ``z_perp = z_f - Q Q^T z_f`` and the result
    is ``S^-1 z_perp``. With the joint rule (``a = Q^T z_f``, ``b = Q^T z_r``, ``z_r = S * mean_i g_r,i``) the
    tangent components with ``a_i b_i > tau`` (those that also lower the retain loss) are added back, capped
    at ``tangent_cap * ||z_perp||``, plus ``beta_rep * Q b``.

    A descent step along the result leaves every retain gradient's first-order change at zero (Euclidean
    metric with plain SGD; Adam's metric with Adam, up to momentum), except for the parts the joint rule
    adds back on purpose.
    """
    scale = torch.ones_like(forget_gradient) if whitening is None else whitening
    z_forget = scale * forget_gradient
    z_retain = scale.unsqueeze(0) * retain_gradients
    z_retain_mean = z_retain.mean(dim=0)
    result = torch.empty_like(forget_gradient)
    ranks, removed, total = [], 0.0, 0.0
    for block in blocks:
        basis = orthonormal_basis(z_retain[:, block], rank, tolerance)
        ranks.append(basis.shape[1])
        z_block = z_forget[block]
        coefficients = basis.T @ z_block
        z_perp = z_block - basis @ coefficients
        removed += float(coefficients.pow(2).sum())
        total += float(z_block.pow(2).sum())
        if joint is not None and basis.shape[1] > 0:
            retain_coefficients = basis.T @ z_retain_mean[block]
            keep = coefficients * retain_coefficients > joint.tau
            tangent = basis @ torch.where(keep, coefficients, torch.zeros_like(coefficients))
            cap = joint.tangent_cap * z_perp.norm()
            tangent_norm = tangent.norm()
            if tangent_norm > cap:
                tangent = tangent * (cap / tangent_norm)
            z_perp = z_perp + tangent + joint.beta_rep * (basis @ retain_coefficients)
        result[block] = z_perp / scale[block]
    return Projection(result, min(ranks) if ranks else 0, removed / total if total > 0 else 0.0)


def retain_gradient_matrix(objective: Callable[[Batch], Tensor], batches: Iterator[Batch], count: int,
                           params: Sequence[nn.Parameter]) -> Tensor:
    """``[count, n]``: the flat gradient of ``objective`` on each of the next ``count`` batches."""
    return torch.stack([flat_gradient(objective(next(batches)), params) for _ in range(count)])
