"""The linear probe and its scores: multinomial logistic regression (torch, L-BFGS), confusion matrices and
balanced accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LogisticProbe",
    "confusion_matrix",
    "balanced_accuracy",
    "balanced_accuracy_batch",
    "balanced_accuracy_score",
]


class LogisticProbe:
    """Multinomial logistic regression in torch: standardised features, L2 penalty, full-batch L-BFGS.

    The features are standardised with the fit set's mean and standard deviation (a constant feature becomes 0);
    the weights start at zero and L-BFGS (strong Wolfe line search) minimises the mean cross-entropy plus
    ``l2 / 2 * ||W||^2`` (the bias is not penalised), in float64 on the CPU, so a fit is deterministic.

    Args:
        l2: L2 penalty on the weights (on the standardised scale).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, l2: float = 1.0e-3, max_iter: int = 200) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.num_classes = 0

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> LogisticProbe:
        """Fit on features ``x`` ``(N, D)`` and integer classes ``y`` ``(N,)`` in ``[0, num_classes)``."""
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        y = torch.as_tensor(y).detach().to("cpu", torch.long)
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"fit expects x (N, D) and y (N,) with N > 0, got {tuple(x.shape)} and {tuple(y.shape)}")
        self.num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        self.mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        self.std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z = (x - self.mean) / self.std
        weight = torch.zeros(z.shape[1], self.num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12,
        )  # fmt: skip

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * self.l2 * (weight * weight).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight = weight.detach()
        self.bias = bias.detach()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(N, num_classes)`` of features ``(N, D)`` (float64, CPU)."""
        if self.weight is None or self.mean is None or self.std is None or self.bias is None:
            raise RuntimeError("LogisticProbe.logits called before fit")
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely class of each row of ``x``."""
        return self.logits(x).argmax(dim=1)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` acting on unstandardised features (``x @ W + b`` equals :meth:`logits`), float32."""
        if self.weight is None or self.mean is None or self.std is None or self.bias is None:
            raise RuntimeError("LogisticProbe.folded called before fit")
        weight = self.weight / self.std[:, None]
        return weight.float(), (self.bias - self.mean @ weight).float()


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` counts, rows the true class, columns the predicted one (int64)."""
    y_true = torch.as_tensor(y_true).reshape(-1).long().cpu()
    y_pred = torch.as_tensor(y_pred).reshape(-1).long().cpu()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.numel()} vs {y_pred.numel()}")
    flat = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean recall over the classes present (rows with a count) of a confusion matrix; NaN when it is empty."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    support = confusion.sum(dim=-1)
    present = support > 0
    if not bool(present.any()):
        return math.nan
    recall = confusion.diagonal(dim1=-2, dim2=-1)[present] / support[present]
    return float(recall.mean())


def balanced_accuracy_batch(confusion: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy of every ``(..., C, C)`` confusion matrix (NaN where empty)."""
    confusion = confusion.double()
    support = confusion.sum(dim=-1)
    recall = confusion.diagonal(dim1=-2, dim2=-1) / support.clamp_min(1)
    present = (support > 0).double()
    return (recall * present).sum(dim=-1) / present.sum(dim=-1)


def balanced_accuracy_score(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int | None = None) -> float:
    """Balanced accuracy (mean per-class recall over the classes present in ``y_true``)."""
    y_true = torch.as_tensor(y_true).reshape(-1).long()
    y_pred = torch.as_tensor(y_pred).reshape(-1).long()
    n = int(num_classes) if num_classes is not None else int(max(int(y_true.max()), int(y_pred.max()))) + 1
    return balanced_accuracy(confusion_matrix(y_true, y_pred, n))
