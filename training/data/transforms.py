"""Training augmentation on whole uint8 batches [B, H, W, 3], already resized to the input size.

In this order, each switchable: random horizontal flip, zero padding and a random crop back to the input size
(the CAMA paper, section 4.2); colour jitter (brightness, contrast, saturation) and random grayscale, which
take away colour cues that change from camera to camera; random erasing (Zhong et al., AAAI 2020) of a
rectangle with random pixel values, against occlusion. The output stays uint8 because the model normalises.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] float -> [B, H, W, 1] luma."""
    return (images * torch.tensor(GRAY_WEIGHTS)).sum(dim=3, keepdim=True)


@dataclass
class TrainAugmentation:
    flip_prob: float = 0.5
    padding: int = 10
    color_jitter: float = 0.0  # strength s: brightness, contrast and saturation factors drawn from [1-s, 1+s]
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    erasing_prob: float = 0.0
    erasing_area: tuple = (0.02, 0.4)
    erasing_aspect: float = 0.3  # aspect ratios drawn log-uniformly from [a, 1/a]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = self._flip(images, generator)
        if self.padding > 0:
            images = self._pad_and_crop(images, generator)
        if self.color_jitter <= 0 and self.grayscale_prob <= 0 and self.erasing_prob <= 0:
            return images
        pixels = images.float()
        if self.color_jitter > 0:
            pixels = self._jitter(pixels, generator)
        if self.grayscale_prob > 0:
            gray = torch.rand(len(pixels), generator=generator) < self.grayscale_prob
            pixels = torch.where(gray.view(-1, 1, 1, 1), _gray(pixels).expand_as(pixels), pixels)
        if self.erasing_prob > 0:
            pixels = self._erase(pixels, generator)
        return pixels.round_().clamp_(0, 255).to(torch.uint8)

    def _flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(images), generator=generator) < self.flip_prob
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)

    def _pad_and_crop(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, height, width, _ = images.shape
        pad = self.padding
        padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
        tops = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        lefts = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = tops.view(-1, 1) + torch.arange(height).view(1, -1)
        cols = lefts.view(-1, 1) + torch.arange(width).view(1, -1)
        index = torch.arange(batch).view(-1, 1, 1)
        return padded[index, rows.view(batch, height, 1), cols.view(batch, 1, width)]

    def _jitter(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = len(pixels)
        s = self.color_jitter
        apply = (torch.rand(batch, generator=generator) < self.color_jitter_prob).float().view(-1, 1, 1, 1)

        def factor() -> torch.Tensor:
            return 1 + apply * (_uniform((batch, 1, 1, 1), 1 - s, 1 + s, generator) - 1)

        pixels = (pixels * factor()).clamp(0, 255)
        mean = _gray(pixels).mean(dim=(1, 2, 3), keepdim=True)
        pixels = ((pixels - mean) * factor() + mean).clamp(0, 255)
        gray = _gray(pixels)
        return ((pixels - gray) * factor() + gray).clamp(0, 255)

    def _erase(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, height, width, _ = pixels.shape
        area = _uniform(batch, *self.erasing_area, generator) * height * width
        bound = abs(math.log(self.erasing_aspect))
        aspect = _uniform(batch, -bound, bound, generator).exp()
        box_h = (area * aspect).sqrt().round().clamp(1, height).long()
        box_w = (area / aspect).sqrt().round().clamp(1, width).long()
        top = (torch.rand(batch, generator=generator) * (height - box_h + 1)).long()
        left = (torch.rand(batch, generator=generator) * (width - box_w + 1)).long()
        rows = torch.arange(height).view(1, -1)
        cols = torch.arange(width).view(1, -1)
        inside_rows = (rows >= top.view(-1, 1)) & (rows < (top + box_h).view(-1, 1))
        inside_cols = (cols >= left.view(-1, 1)) & (cols < (left + box_w).view(-1, 1))
        apply = torch.rand(batch, generator=generator) < self.erasing_prob
        mask = (inside_rows.view(batch, height, 1) & inside_cols.view(batch, 1, width) & apply.view(-1, 1, 1)).unsqueeze(3)
        noise = torch.rand(pixels.shape, generator=generator) * 255
        return torch.where(mask, noise, pixels)
