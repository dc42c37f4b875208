"""Spectral entropy of each layer's representation, per class, on a fixed probe set.

For the token representations X (rows: the probe tokens of one class,
columns: features) of a layer, with singular values s_i and p_i = s_i^2 /
sum s^2, the spectral entropy is ``-sum p_i log p_i / log(rank bound)``, in
[0, 1]: near 0 when the class's representations collapse onto a few
directions, near 1 when they spread over all of them. Tracked over training
per class, it shows which layers specialise on which data.

The probe is fixed for the whole run (the first ``samples_per_class``
validation examples of each class, of which ``tokens_per_class`` evenly
spaced token positions are used), so entries are comparable over time
and the same after a resume. It runs in eval mode without gradients and
consumes no random numbers, so recording it does not change training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smalti.core.batch import Batch
from smalti.models.rows import set_rows


def representation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own choice (``representation_layers()``) or every module that owns parameters."""
    chosen = getattr(model, "representation_layers", None)
    if chosen is not None:
        return dict(chosen())
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def probe_batch(val, samples_per_class: int, n_classes: int) -> Batch | None:
    """The first ``samples_per_class`` validation examples of every class that has any."""
    classes = torch.as_tensor(val.classes)
    picked = []
    for c in range(n_classes):
        picked.append((classes == c).nonzero().flatten()[:samples_per_class])
    indices = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
    return val.gather(indices) if indices.numel() else None


def smaller_gram(x: torch.Tensor) -> torch.Tensor:
    """[N, r, r] with r = min(rows, features): its eigenvalues are the squared singular values of ``x``,
    several times cheaper to find than by an SVD for these shapes."""
    return x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x


def gram_entropy(gram: torch.Tensor) -> torch.Tensor:
    """Normalised spectral entropies of a [N, r, r] stack of Gram matrices (r bounds the rank)."""
    power = torch.linalg.eigvalsh(gram).clamp(min=0)
    p = power / power.sum(dim=1, keepdim=True).clamp(min=1e-30)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(dim=1)
    return entropy / math.log(max(2, gram.shape[-1]))


class EntropyProbe:
    """Measures every (class, layer) cell with one eigensolve per Gram-matrix shape (usually one in all).

    The Gram matrices are formed on the model's device; their eigenvalues are
    found on the CPU: they are tiny (at most ``tokens_per_class`` square), and
    on a GPU a batched eigensolver call costs milliseconds of launches and a
    synchronisation per call, where the CPU solves all of them in well under one.
    """

    def __init__(self, model: nn.Module, probe: Batch, class_names: list[str], tokens_per_class: int = 32) -> None:
        self.tokens_per_class = tokens_per_class
        self.model, self.probe = model, probe
        self.layers = representation_layers(model)
        self.layer_names = list(self.layers)
        row_class = probe.provenance[:, 0]
        self.classes = sorted(set(row_class.tolist()))
        self.class_names = [class_names[c] for c in self.classes]
        self._rows = [(row_class == c).nonzero().flatten() for c in self.classes]
        # per layer width: classes and their index tensors, moved to the device once
        self._on_device: dict[tuple, list[tuple[list[int], torch.Tensor]]] = {}

    @torch.no_grad()
    def measure(self) -> torch.Tensor:
        """[classes, layers] normalised spectral entropies (a CPU tensor)."""
        captured: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_hook(self._capture(name, captured)) for name, module in self.layers.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            batch = self.probe.to(device)
            set_rows(self.model, batch)
            self.model(batch.inputs)
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        # Per layer, one gather and one batched product for each group of classes with as many probe
        # tokens; then one eigensolve per Gram-matrix size.
        stacks: dict[int, tuple[list[torch.Tensor], list[int], list[int]]] = {}
        for j, name in enumerate(self.layer_names):
            output = captured.get(name)
            if output is None:
                continue
            features = output.shape[-1]
            tokens = output.reshape(-1, features)
            per_example = output[0].numel() // features
            for classes, index in self._token_groups(per_example, device):
                picked = tokens.index_select(0, index.reshape(-1)).view(len(classes), index.shape[1], features)
                grams, ks, js = stacks.setdefault(min(index.shape[1], features), ([], [], []))
                grams.append(smaller_gram(picked.float()))
                ks.extend(classes)
                js.extend([j] * len(classes))
        result = torch.zeros(len(self.classes), len(self.layer_names))
        for grams, ks, js in stacks.values():
            result[ks, js] = gram_entropy(torch.cat(grams).cpu())
        return result

    def _token_groups(self, per_example: int, device: torch.device) -> list[tuple[list[int], torch.Tensor]]:
        """Classes with as many probe rows, and for each the flat indices [classes, tokens] of its evenly spaced
        token rows, for a layer whose output has ``per_example`` token rows per example (cached)."""
        key = ("groups", per_example, device)
        if key not in self._on_device:
            by_count: dict[int, list[int]] = {}
            for k, rows in enumerate(self._rows):
                by_count.setdefault(len(rows), []).append(k)
            groups = []
            for count, classes in by_count.items():
                positions = self._positions(count * per_example)
                index = torch.stack(
                    [self._rows[k][positions // per_example] * per_example + positions % per_example for k in classes]
                )
                groups.append((classes, index.to(device)))
            self._on_device[key] = groups
        return self._on_device[key]

    def _positions(self, rows: int) -> torch.Tensor:
        """At most ``tokens_per_class`` of ``rows`` token rows, evenly spaced (the cost grows with the cube
        of this)."""
        if rows <= self.tokens_per_class:
            return torch.arange(rows)
        return torch.linspace(0, rows - 1, self.tokens_per_class).round().long()

    @staticmethod
    def _capture(name: str, captured: dict[str, torch.Tensor]):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() >= 2:
                captured[name] = output.detach()

        return hook
