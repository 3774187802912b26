"""Training augmentation on whole uint8 batches [B, H, W, 3], already resized to the input size.

In this order, each switchable: random horizontal flip; zero padding and a random crop back to the input size
(the CAMA paper, section 4.2), or a random-sized crop resized back to it (``crop_area``: a box of a random share
of the image's area and a random width/height ratio, as CLPD trains); colour jitter (brightness, contrast, saturation)
and random grayscale, which
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
    crop_area: tuple = ()  # (low, high): random-sized crop of this share of the area, instead of pad-and-crop; (): off
    crop_aspect: tuple = (1 / 3, 1 / 2)  # its width / height, drawn log-uniformly from [low, high]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = self._flip(images, generator)
        if self.crop_area:
            images = resized_crop(images, self.crop_boxes(*images.shape[:3], generator))
        elif self.padding > 0:
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

    def crop_boxes(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """[B, 4] boxes (top, left, box height, box width) in pixels: area a share of the image drawn uniformly
        from ``crop_area``, width / height log-uniformly from ``crop_aspect``, clipped to the image, placed
        uniformly at random inside it."""
        area = _uniform(batch, *self.crop_area, generator) * height * width
        low, high = (math.log(a) for a in self.crop_aspect)
        aspect = _uniform(batch, low, high, generator).exp()
        box_h = (area / aspect).sqrt().clamp(1, height)
        box_w = (area * aspect).sqrt().clamp(1, width)
        top = torch.rand(batch, generator=generator) * (height - box_h)
        left = torch.rand(batch, generator=generator) * (width - box_w)
        return torch.stack([top, left, box_h, box_w], dim=1)

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
        mask = (
            inside_rows.view(batch, height, 1) & inside_cols.view(batch, 1, width) & apply.view(-1, 1, 1)
        ).unsqueeze(3)
        noise = torch.rand(pixels.shape, generator=generator) * 255
        return torch.where(mask, noise, pixels)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, height, width in pixels, ``boxes`` [B, 4]) resized bilinearly back to the
    image's size, in one ``grid_sample`` for the batch."""
    batch, height, width, _ = images.shape
    top, left, box_h, box_w = boxes.unbind(1)
    theta = torch.zeros(batch, 2, 3)
    # affine_grid maps output coordinates in [-1, 1] to input ones: scale to the box, move to its centre
    theta[:, 0, 0], theta[:, 1, 1] = box_w / width, box_h / height
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    grid = F.affine_grid(theta, [batch, 3, height, width], align_corners=False)
    pixels = F.grid_sample(
        images.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
