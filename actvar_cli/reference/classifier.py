"""The yardstick of the shapes set: a small classifier that plays Inception's part.

FID, IS and precision/recall of samples of the reference model are computed through
torch-fidelity with this network as the feature extractor (``actvar-shapes``): its
penultimate layer gives the features, its logits the class probabilities, and
``class_accuracy`` asks whether a sample shows the class it was generated for.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..files import sha256_file
from ..models.builtin import weights_path
from ..models.checkpoint import read_state_dict
from .shapes import IMAGE_SIZE, NUM_CLASSES

FEATURE_DIM = 64
EXTRACTOR_NAME = "actvar-shapes"


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ShapesClassifier(nn.Module):
    """Six 3x3 convs (64 -> 8 px), global pooling, a 64-d feature layer and the class logits."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(3, w, 1),
            *_conv(w, w, 2),  # 32 px
            *_conv(w, 2 * w, 1),
            *_conv(2 * w, 2 * w, 2),  # 16 px
            *_conv(2 * w, 4 * w, 1),
            *_conv(4 * w, 4 * w, 2),  # 8 px
        )
        self.features = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of images in [-1, 1]."""
        h = self.body(img_B3HW).mean(dim=(2, 3))
        feats = F.relu(self.features(h))
        return feats, self.head(feats)


def uint8_to_input(img_B3HW: torch.Tensor) -> torch.Tensor:
    """uint8 images of any size (as torch-fidelity hands them over) to [-1, 1] at the set's size."""
    x = img_B3HW.float().div(127.5).sub(1)
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x


def load_classifier(source: str | os.PathLike):
    """The shapes classifier (the reference model's yardstick) from its safetensors file."""

    sd, _, _ = read_state_dict(source)
    clf = ShapesClassifier()
    try:
        clf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} is not a shapes classifier") from e
    return clf.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def shipped_classifier() -> ShapesClassifier:

    return load_classifier(weights_path("classifier"))


def shipped_classifier_sha() -> str:

    return sha256_file(weights_path("classifier"))


def register_with_fidelity() -> str:
    """Register the shipped classifier as torch-fidelity's ``actvar-shapes`` extractor (once)."""
    import torch_fidelity  # imports torchvision: only where metrics are computed
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, _extractor_class())
    return EXTRACTOR_NAME


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ShapesExtractor(FeatureExtractorBase):
        """Features: the classifier's 64-d penultimate layer; logits: its class scores."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = shipped_classifier()

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

        def forward(self, x):
            feats, logits = self.net(uint8_to_input(x))
            by_name = {"features": feats.double(), "logits": logits.double()}
            return tuple(by_name[name] for name in self.features_list)

    return ShapesExtractor
