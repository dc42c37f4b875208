"""A denoising diffusion model (DDPM) on a ``diffusers`` UNet, behind Smalti's model interface.

Why each image's noise is a function of the image's example id and the step: the trainer's step is
``loss(model(inputs), targets)``, the same for every model, and governance hooks the modules inside it. Drawing
each row's timestep and noise in ``forward``, from a generator seeded by (the recipe's seed, the step, the
example id), keeps that step unchanged (no diffusion branch in the loop), and makes the draws depend on nothing
else: not on the other rows of the batch, how the step was cut into microbatches, how the router split them,
how many processes share it, or what ran before. So a run killed mid-epoch resumes drawing the same noise for
the same images, bitwise (G7: the step is in the checkpoint); perturbing one class's images changes no other
image's noise (G1); a replay that leaves a class out draws what the counterfactual run draws (G5); and an
auditor can recompute any step's per-class gradients from a checkpoint alone (G4). Evaluation draws with its
own key, so held-out losses are comparable from one evaluation to the next.

Whoever runs the model names the rows first (``smalti.models.rows.set_rows``: the loop, evaluation, deletion);
a forward pass without them is refused rather than drawn from somewhere unrecorded.

``forward`` returns the predicted and the true noise stacked as ``[B, 2, C, H, W]``; ``loss`` is the summed
per-image mean squared error, and ``loss_units`` counts images, so the trainer's mean is the usual DDPM loss.

``DiffusionUNet`` adopts the UNet's children, so parameters keep the names diffusers gives them
(``down_blocks.1.attentions.0.to_q.weight``): routing policies name what users see in diffusers. Every
parameter sits in a convolution, a linear layer or a group norm, each of which treats each image on its own,
so the router can split any module by rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smalti.errors import RecipeError

EVALUATION_DRAW = -1  # the draw key of evaluation passes: the same noise for an example at every evaluation


class DiffusionUNet(nn.Module):
    """Images in [0, 1], ``[B, C, H, W]`` -> predicted and true noise, ``[B, 2, C, H, W]``."""

    unet: Any  # diffusers.UNet2DModel, set with object.__setattr__ (its children are registered as ours)

    def __init__(self, section: Any, image_size: int, in_channels: int = 1, noise_seed: int = 0) -> None:
        super().__init__()
        try:
            from diffusers.models.unets.unet_2d import UNet2DModel
            from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
        except ImportError:
            raise RecipeError("model.name diffusion needs diffusers: pip install 'smalti[diffusion]'") from None
        _quiet_diffusers()
        levels = len(section.block_out_channels)
        if image_size % (2 ** (levels - 1)):
            raise RecipeError(
                f"data.image_size ({image_size}) must be divisible by {2 ** (levels - 1)}: the UNet halves it "
                f"{levels - 1} times (model.diffusion.block_out_channels has {levels} levels)"
            )
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(section.block_out_channels),
            layers_per_block=section.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in section.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(section.attention)),
            norm_num_groups=section.norm_num_groups,
            attention_head_dim=section.attention_head_dim,
            dropout=section.dropout,
        )
        object.__setattr__(self, "unet", unet)
        for name, child in unet.named_children():
            self.add_module(name, child)
        self.scheduler_config = {
            "num_train_timesteps": section.train_timesteps,
            "beta_schedule": section.beta_schedule,
            "prediction_type": "epsilon",
        }
        schedule = DDPMScheduler(**self.scheduler_config)
        self._alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)  # not a buffer: not state, not averaged
        self.train_timesteps = section.train_timesteps
        self.image_size = image_size
        self.in_channels = in_channels
        self.noise_seed = noise_seed
        self._rows: tuple[torch.Tensor, int] | None = None  # the next forward pass's example ids and draw key

    def set_row_examples(self, sample_ids: torch.Tensor, draw: int | None) -> None:
        """The examples the next forward pass runs, and the pass (a step's batch number; None: evaluation)."""
        self._rows = (sample_ids.detach().to("cpu", torch.int64), EVALUATION_DRAW if draw is None else int(draw))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        clean = images * 2.0 - 1.0  # DDPM works on [-1, 1]
        timesteps, noise = self._draw(clean)
        alpha = self._alphas_cumprod.to(clean.device)[timesteps].view(-1, *([1] * (clean.dim() - 1)))
        noisy = alpha.sqrt() * clean + (1.0 - alpha).sqrt() * noise
        predicted = self.unet(noisy, timesteps).sample
        return torch.stack([predicted, noise.to(predicted.dtype)], dim=1)

    def _draw(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's timestep and noise, from its own generator keyed by (seed, draw, example id)."""
        rows, taken = clean.shape[0], self._rows
        self._rows = None  # used once: a second forward pass must name its rows again
        if taken is None or taken[0].shape[0] != rows:
            given = "none" if taken is None else f"{taken[0].shape[0]} example ids"
            raise RuntimeError(
                f"a diffusion model's forward pass of {rows} images needs their example ids first (given: {given}): "
                "call smalti.models.rows.set_rows(model, batch, step) before it"
            )
        ids, draw = taken
        timesteps = torch.empty(rows, dtype=torch.int64)
        noise = torch.empty((rows, *clean.shape[1:]), dtype=torch.float32)
        for row, example in enumerate(ids.tolist()):
            generator = torch.Generator().manual_seed(noise_key(self.noise_seed, draw, example))
            timesteps[row] = torch.randint(0, self.train_timesteps, (1,), generator=generator)
            noise[row] = torch.randn(clean.shape[1:], generator=generator)
        return timesteps.to(clean.device), noise.to(clean.device, clean.dtype)

    @staticmethod
    def example_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each image's mean squared error between predicted and true noise [B]."""
        predicted, noise = outputs.float().unbind(1)
        return (predicted - noise).pow(2).flatten(1).mean(1)

    @classmethod
    def loss(cls, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed over images (``loss_units`` counts them); ``targets`` (the digits) are not needed."""
        return cls.example_losses(outputs, targets).sum()

    @staticmethod
    def loss_units(targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(targets.shape[0])

    @torch.no_grad()
    def sample(self, count: int, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` images in [0, 1] by DDPM ancestral sampling over ``steps`` of the training timesteps."""
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        if not 1 <= steps <= self.train_timesteps:
            raise RecipeError(f"steps must be between 1 and the {self.train_timesteps} training timesteps, got {steps}")
        schedule = DDPMScheduler(**self.scheduler_config)
        schedule.set_timesteps(steps)
        device = next(self.parameters()).device
        shape = (count, self.in_channels, self.image_size, self.image_size)
        images = torch.randn(shape, generator=generator).to(device)
        for t in schedule.timesteps:
            predicted = self.unet(images, t.to(device).expand(count)).sample
            images = schedule.step(predicted, t, images, generator=generator).prev_sample
        return ((images.clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


def noise_key(seed: int, draw: int, example: int) -> int:
    """A 63-bit generator seed for one example's draw: distinct inputs give unrelated seeds."""
    digest = hashlib.blake2b(f"{seed}/{draw}/{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _quiet_diffusers() -> None:
    """No progress bars or Hub lookups: runs are offline, and their output is the trainer's."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


def image_grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] tiled into one [C, rows*H, columns*W] picture, one pixel apart."""
    count, channels, height, width = images.shape
    columns = columns or max(1, int(count**0.5 + 0.999999))
    rows = -(-count // columns)
    padded = F.pad(images, (0, 1, 0, 1), value=1.0)
    canvas = torch.ones(rows * columns, channels, height + 1, width + 1)
    canvas[:count] = padded
    grid = canvas.view(rows, columns, channels, height + 1, width + 1).permute(2, 0, 3, 1, 4)
    return grid.reshape(channels, rows * (height + 1), columns * (width + 1))


def save_png(images: torch.Tensor, path: Any, scale: int = 4) -> None:
    """A grid of ``images`` as an 8-bit grayscale (or RGB) PNG, each pixel ``scale`` times as large."""
    from PIL import Image

    grid = image_grid(images)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = (grid * 255.0).round().clamp(0, 255).to(torch.uint8)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path, format="PNG")


def lora_targets_hint(targets: Sequence[str]) -> str:
    return (
        f"model.lora.target_modules {list(targets)}: a diffusers UNet's attention projections are "
        "to_q, to_k, to_v and to_out.0, its convolutions conv1 and conv2"
    )
