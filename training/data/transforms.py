"""Training augmentation as in the CAMA paper (section 4.2): random horizontal flip, zero padding and a random
crop back to the input size. Works on whole uint8 batches [B, H, W, 3] already resized to the input size."""
import torch
import torch.nn.functional as F


class TrainAugmentation:
    def __init__(self, flip_prob: float = 0.5, padding: int = 10):
        self.flip_prob = flip_prob
        self.padding = padding

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, height, width, _ = images.shape
        flip = torch.rand(batch, generator=generator) < self.flip_prob
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)
        if self.padding <= 0:
            return images
        pad = self.padding
        padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
        tops = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        lefts = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = tops.view(-1, 1) + torch.arange(height).view(1, -1)
        cols = lefts.view(-1, 1) + torch.arange(width).view(1, -1)
        index = torch.arange(batch).view(-1, 1, 1)
        return padded[index, rows.view(batch, height, 1), cols.view(batch, 1, width)]
