"""A user's own modality, registered from a module named in `model.modules` (used by the tests)."""

import torch

from harness.multimodal import register_modality


class FeatureSum(torch.nn.Module):
    """One number per example: the sum of its features (a deliberately tiny encoder)."""

    out_dim = 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().sum(dim=-1, keepdim=True)


@register_modality("feature_sum", inputs=("features",))
def feature_sum(cfg, context) -> torch.nn.Module:
    return FeatureSum()
