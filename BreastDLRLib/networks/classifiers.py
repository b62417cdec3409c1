"""Lesion classifiers of published deep-learning radiomics (DLR) systems for breast ultrasound.

* :class:`ThreePlaneFusion` — Liu et al. 2025 (automated breast volume scanner, ABVS): one ResNet trunk
  per plane; transverse and sagittal features are added, the sum is concatenated with the coronal
  features, a fully connected layer halves the fused width (2C → C, ReLU, dropout), then C → classes.
* :class:`EmbeddingNet` — Lu et al. 2025: a ResNet (or, for Yang et al. 2024, a VGG11) whose final layer becomes a 128-wide image
  embedding (Linear C → 128, ReLU) followed by a classification layer (128 → classes).  The embedding
  feeds the clinical fusion heads of :mod:`BreastDLRLib.clinical`.
* :class:`EnsembleNet` — members of one architecture whose class probabilities are averaged.
* :func:`predict_frames` — per-lesion probability as the mean of the per-frame softmax P(malignant).
* :func:`build_classifier` — rebuild a network from a bundle manifest's ``architecture``/``arguments``.

Trunks are torchvision ResNets (or VGGs, :class:`VGGTrunk`, or the segmenter's EfficientNet-b0 encoder,
:class:`EfficientNetTrunk`) built with ``weights=None`` (nothing is downloaded).  Class index 1 is
"malignant" (or "high risk") by convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torchvision import models as tv_models

from ..errors import ModelBundleError

PLANES: Tuple[str, str, str] = ("transverse", "sagittal", "coronal")
RESNETS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
    "resnet101": tv_models.resnet101,
}
VGGS: Dict[str, Callable[..., nn.Module]] = {   # Yang et al. 2024 (CLDLR) used VGG11 features
    "vgg11_bn": tv_models.vgg11_bn,
    "vgg11": tv_models.vgg11,
}
EFFICIENTNETS: Tuple[str, ...] = ("efficientnet-b0",)   # the segmenter's encoder (segmentation-models-pytorch)
BACKBONES: Tuple[str, ...] = tuple(RESNETS) + tuple(VGGS) + EFFICIENTNETS

PlaneInput = Union[torch.Tensor, Mapping[str, Optional[torch.Tensor]]]


def _match_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Replicate a grey image (1 channel) to ``in_channels``; refuse any other mismatch."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] == in_channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_channels, -1, -1)
    raise ValueError(f"expected {in_channels} (or 1 grey) channels, got {x.shape[1]}")


class _Trunk(nn.Module):
    """A convolutional trunk: ``feature_map(x)`` (the last stage's map, the Grad-CAM target's output) and global
    average pooling (``self.avgpool``); ``forward(x) -> (B, out_features)``."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(feature_map), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))


class ResNetTrunk(_Trunk):
    """A torchvision ResNet up to the last convolutional stage and global average pooling.

    ``forward(x: (B, C, H, W)) -> (B, out_features)``; ``out_features`` is 2048 for resnet50 and 512
    for resnet18.  Grey (1-channel) input is replicated to the trunk's ``in_channels``.
    """

    def __init__(self, backbone: str = "resnet50", in_channels: int = 3) -> None:
        super().__init__()
        if backbone not in RESNETS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(RESNETS)}")
        net = RESNETS[backbone](weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone = backbone
        self.in_channels = int(in_channels)
        self.out_features = int(net.fc.in_features)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, H/32, W/32) map of the last stage, before pooling."""
        x = _match_channels(x, self.in_channels)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def last_conv_block(self) -> nn.Module:
        """The last residual block of the last convolutional stage (``layer4[-1]``), the usual
        Grad-CAM target for ResNets: its output is the (B, C, H/32, W/32) map that is pooled."""
        return self.layer4[-1]


class VGGTrunk(_Trunk):
    """The convolutional part of a torchvision VGG (``features``) and global average pooling.

    ``forward(x: (B, C, H, W)) -> (B, 512)``.  The ReLUs are made out-of-place so that Grad-CAM can hook the
    last one (:meth:`last_conv_block`): the activation map that is pooled.
    """

    def __init__(self, backbone: str = "vgg11_bn", in_channels: int = 3) -> None:
        super().__init__()
        if backbone not in VGGS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        features = VGGS[backbone](weights=None).features
        if in_channels != 3:
            first = features[0]
            features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
        for m in features.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.backbone, self.in_channels = backbone, int(in_channels)
        self.features = features
        self.out_features = int([m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map of the last convolution (after its ReLU), before pooling."""
        return self.features(_match_channels(x, self.in_channels))

    def last_conv_block(self) -> nn.Module:
        """The last ReLU of ``features`` (after the last convolution, before the last max-pooling)."""
        return [m for m in self.features if isinstance(m, nn.ReLU)][-1]


class EfficientNetTrunk(_Trunk):
    """The EfficientNet-b0 encoder of segmentation-models-pytorch (the lesion segmenter's encoder) and global
    average pooling, so that a classifier can start from a trained segmenter (:meth:`load_segmenter_encoder`).

    ``forward(x: (B, C, H, W)) -> (B, 320)``.  Each image is standardised to zero mean and unit variance first,
    as the segmenter's input is; grey input is replicated to ``in_channels``.
    """

    def __init__(self, backbone: str = "efficientnet-b0", in_channels: int = 3) -> None:
        super().__init__()
        if backbone not in EFFICIENTNETS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        from segmentation_models_pytorch.encoders import get_encoder

        self.encoder = get_encoder(backbone, in_channels=in_channels, depth=5, weights=None)
        self.backbone, self.in_channels = backbone, int(in_channels)
        self.out_features = int(self.encoder.out_channels[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's (B, 320, H/32, W/32) output, before pooling."""
        x = _match_channels(x, self.in_channels)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return self.encoder((x - mean) / std)[-1]

    def last_conv_block(self) -> nn.Module:
        """The encoder's last MBConv block: its output is the (B, 320, H/32, W/32) map that is pooled."""
        return self.encoder._blocks[-1]

    def load_segmenter_encoder(self, state: Mapping[str, torch.Tensor]) -> int:
        """Copy the encoder of a trained segmenter (its state dict, keys ``encoder.*``) into this trunk; a
        1-channel segmenter's first convolution is spread over the trunk's identical grey channels.  Returns
        the number of tensors copied; an encoder of another shape is an error."""
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        own = self.encoder.state_dict()
        stem = "_conv_stem.weight"
        if stem in enc and enc[stem].shape[1] != own[stem].shape[1]:
            if enc[stem].shape[1] != 1:
                raise ValueError(f"the segmenter's encoder takes {enc[stem].shape[1]} channels, this trunk "
                                 f"{own[stem].shape[1]}")
            enc[stem] = enc[stem].repeat(1, own[stem].shape[1], 1, 1) / own[stem].shape[1]
        bad = sorted(k for k in own if k not in enc or enc[k].shape != own[k].shape)
        if bad:
            raise ValueError(f"the segmenter's encoder does not fit this {self.backbone} trunk ({len(bad)} tensors "
                             f"missing or of another shape, e.g. {bad[0]})")
        self.encoder.load_state_dict({k: enc[k] for k in own})
        return len(own)


def make_trunk(backbone: str = "resnet50", in_channels: int = 3) -> nn.Module:
    """A ResNet, VGG or EfficientNet trunk by name (``BACKBONES``), built with ``weights=None``."""
    if backbone in EFFICIENTNETS:
        return EfficientNetTrunk(backbone, in_channels)
    if backbone in VGGS:
        return VGGTrunk(backbone, in_channels)
    if backbone in RESNETS:
        return ResNetTrunk(backbone, in_channels)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


class ThreePlaneFusion(nn.Module):
    """Liu et al. 2025 three-plane fusion classifier.

    ``planes`` names the three inputs in role order: features of ``planes[0]`` and ``planes[1]``
    (transverse, sagittal) are ADDED; the sum is CONCATENATED with ``planes[2]`` (coronal), giving width
    2C; ``reduce`` (Linear 2C → C) + ReLU gives the fused embedding; dropout; ``classifier`` (C → classes).

    Input: a dict plane → (B, 3 or 1, H, W) (a plane absent from the dict or set to None is missing),
    a tensor (B, 3, C, H, W) with planes in ``planes`` order, or a tensor (B, C, H, W) meaning the
    first plane (transverse) only — a 2D image.

    Missing planes: a missing plane contributes a feature vector of ZEROS, so a missing sagittal plane
    leaves the transverse features alone in the sum, and a missing coronal plane leaves zeros in the
    concatenated half.  ``plane_mask`` (B, 3) bool marks, per sample, which planes are present (AND-ed with
    the planes given).  Each sample needs at least one plane.  Zero-filling is exact for the planes
    given, but a net trained only on complete triplets has not seen zeros: treat 2D results with care.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 2,
        planes: Sequence[str] = PLANES,
        dropout: float = 0.5,
        in_channels: int = 3,
        shared_trunk: bool = False,
    ) -> None:
        super().__init__()
        planes = tuple(str(p) for p in planes)
        if len(planes) != 3 or len(set(planes)) != 3:
            raise ValueError(f"ThreePlaneFusion needs three distinct plane names, got {planes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone, self.num_classes, self.planes = backbone, int(num_classes), planes
        self.dropout_p, self.in_channels = float(dropout), int(in_channels)
        # shared_trunk: one trunk (weights shared by the three planes, a third of the size) instead of one each
        self.shared_trunk = bool(shared_trunk)
        names = ("shared",) if self.shared_trunk else planes
        self.trunks = nn.ModuleDict({p: make_trunk(backbone, in_channels) for p in names})
        # one pass-through module per plane on its trunk's last feature map: the Grad-CAM target of that plane
        # (a shared trunk's own layers run three times per forward and cannot tell the planes apart); no weights
        self.taps = nn.ModuleDict({p: nn.Identity() for p in planes})
        width = self.trunk_for(planes[0]).out_features
        self.feature_width = width
        self.reduce = nn.Linear(2 * width, width)
        self.dropout = nn.Dropout(self.dropout_p)
        self.classifier = nn.Linear(width, self.num_classes)

    # ------------------------------------------------------------------ inputs
    def _split(self, x: PlaneInput) -> Dict[str, torch.Tensor]:
        if isinstance(x, Mapping):
            unknown = set(x) - set(self.planes)
            if unknown:
                raise ValueError(f"unknown plane(s) {sorted(unknown)}; this model uses {list(self.planes)}")
            given = {p: t for p, t in x.items() if t is not None}
        elif isinstance(x, torch.Tensor) and x.ndim == 5:
            if x.shape[1] != 3:
                raise ValueError(f"expected (B, 3 planes, C, H, W), got {tuple(x.shape)}")
            given = {p: x[:, n] for n, p in enumerate(self.planes)}
        elif isinstance(x, torch.Tensor) and x.ndim == 4:
            given = {self.planes[0]: x}
        else:
            raise ValueError("expected a dict plane → (B, C, H, W), a (B, 3, C, H, W) or a (B, C, H, W) tensor")
        if not given:
            raise ValueError("no plane was given")
        sizes = {int(t.shape[0]) for t in given.values()}
        if len(sizes) != 1:
            raise ValueError(f"planes have different batch sizes {sorted(sizes)}")
        return given

    def presence(self, x: PlaneInput, plane_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3) bool: which planes count for each sample (given AND ``plane_mask``)."""
        given = self._split(x)
        ref = next(iter(given.values()))
        present = torch.tensor([p in given for p in self.planes], device=ref.device)
        present = present.unsqueeze(0).expand(ref.shape[0], 3)
        if plane_mask is not None:
            plane_mask = torch.as_tensor(plane_mask, dtype=torch.bool, device=ref.device)
            if plane_mask.shape != present.shape:
                raise ValueError(f"plane_mask must have shape {tuple(present.shape)}, got {tuple(plane_mask.shape)}")
            present = present & plane_mask
        empty = (~present.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"sample(s) {empty} have no plane left after masking")
        return present

    # ------------------------------------------------------------------ computation
    def plane_features(self, x: PlaneInput, plane_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-plane trunk features (B, C); a missing plane (or masked sample) gives zeros."""
        given = self._split(x)
        present = self.presence(given, plane_mask)
        ref = next(iter(given.values()))
        feats: Dict[str, torch.Tensor] = {}
        for n, plane in enumerate(self.planes):
            keep = present[:, n]
            if plane in given and bool(keep.any()):
                trunk = self.trunk_for(plane)
                f = trunk.pool(self.taps[plane](trunk.feature_map(given[plane])))
                feats[plane] = f * keep.to(f.dtype).unsqueeze(1)
            else:
                feats[plane] = torch.zeros(ref.shape[0], self.feature_width, dtype=ref.dtype, device=ref.device)
        return feats

    def fuse_features(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fused width-C embedding: ReLU(reduce(cat(f0 + f1, f2))); missing keys count as zeros."""
        ref = next(iter(features.values()))
        zeros = torch.zeros(ref.shape[0], self.feature_width, dtype=ref.dtype, device=ref.device)
        f0, f1, f2 = (features.get(p, zeros) for p in self.planes)
        return torch.relu(self.reduce(torch.cat([f0 + f1, f2], dim=1)))

    def embed(self, x: PlaneInput, plane_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C) fused embedding (before dropout and the classification layer)."""
        return self.fuse_features(self.plane_features(x, plane_mask))

    def forward(self, x: PlaneInput, plane_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.classifier(self.dropout(self.embed(x, plane_mask)))

    def feature_layers(self) -> Dict[str, nn.Module]:
        """plane → the pass-through module on that plane's last feature map (Grad-CAM target; one per plane,
        also when the planes share a trunk)."""
        return {p: self.taps[p] for p in self.planes}

    def trunk_for(self, plane: str) -> nn.Module:
        """The ResNet trunk that encodes ``plane``."""
        return self.trunks["shared" if self.shared_trunk else plane]

    def config(self) -> Dict[str, Any]:
        """``{"architecture", "arguments"}`` for a bundle manifest; :func:`build_classifier` inverts it."""
        return {
            "architecture": "ThreePlaneFusion",
            "arguments": {
                "backbone": self.backbone,
                "num_classes": self.num_classes,
                "planes": list(self.planes),
                "dropout": self.dropout_p,
                "in_channels": self.in_channels,
                "shared_trunk": self.shared_trunk,
            },
        }


class PlaneView(nn.Module):
    """One plane of a :class:`ThreePlaneFusion` input as a 4D-input model, the other planes held fixed.

    ``PlaneView(model, x, "sagittal")(img)`` = ``model({**x, "sagittal": img})``.  Grad-CAM tools that
    expect a (B, C, H, W) input use it with ``model.feature_layers()[plane]`` as target layer.
    """

    def __init__(self, model: ThreePlaneFusion, planes: Mapping[str, Optional[torch.Tensor]], plane: str,
                 plane_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if plane not in model.planes:
            raise ValueError(f"unknown plane {plane!r}; this model uses {list(model.planes)}")
        self.model, self.plane, self.plane_mask = model, plane, plane_mask
        self.others = {p: (None if t is None else t.detach()) for p, t in planes.items() if p != plane}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model({**self.others, self.plane: image}, self.plane_mask)


class EmbeddingNet(nn.Module):
    """Lu et al. 2025 image model: ResNet trunk → Linear(C → embedding_dim) → ReLU = the embedding;
    dropout → Linear(embedding_dim → classes) = the logits.

    The embedding is exactly what the classification layer sees (``logits = classifier(embed(x))`` in
    eval mode), so it is non-negative; it is the image input of the clinical fusion heads.  Takes one 2D
    view (B, C, H, W); apply it to each plane of a volume separately.  Grey images are replicated to 3
    channels unless ``in_channels=1``.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        embedding_dim: int = 128,
        num_classes: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone, self.embedding_dim, self.num_classes = backbone, int(embedding_dim), int(num_classes)
        self.in_channels, self.dropout_p = int(in_channels), float(dropout)
        self.trunk = make_trunk(backbone, in_channels)
        self.feature_width = self.trunk.out_features
        self.embedding = nn.Linear(self.feature_width, self.embedding_dim)
        self.dropout = nn.Dropout(self.dropout_p)
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embedding_dim) image embedding."""
        return torch.relu(self.embedding(self.trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.classifier(self.dropout(self.embed(x)))

    def feature_layers(self) -> Dict[str, nn.Module]:
        """``{"image": last convolutional block}`` (Grad-CAM target)."""
        return {"image": self.trunk.last_conv_block()}

    def config(self) -> Dict[str, Any]:
        return {
            "architecture": "EmbeddingNet",
            "arguments": {
                "backbone": self.backbone,
                "embedding_dim": self.embedding_dim,
                "num_classes": self.num_classes,
                "in_channels": self.in_channels,
                "dropout": self.dropout_p,
            },
        }


class EnsembleNet(nn.Module):
    """Several networks of one architecture (trained apart, e.g. with other seeds on the same split), averaged.

    ``softmax(forward(x))`` is the mean of the members' class probabilities (``forward`` returns the log of that
    mean, so every caller that applies a softmax gets the ensemble's probability).  ``embed`` concatenates the
    members' embeddings; ``feature_layers`` lists every member's Grad-CAM target for each key, and Grad-CAM over
    several target layers averages their maps.
    """

    def __init__(self, member_architecture: str = "EmbeddingNet", member_arguments: Optional[Mapping[str, Any]] = None,
                 n_members: int = 2) -> None:
        super().__init__()
        if member_architecture == "EnsembleNet" or member_architecture not in ARCHITECTURES:
            raise ValueError(f"an ensemble's members must be one of {', '.join(a for a in ARCHITECTURES if a != 'EnsembleNet')}, "
                             f"got {member_architecture!r}")
        if int(n_members) < 1:
            raise ValueError(f"an ensemble needs at least one member, got {n_members}")
        self.member_architecture = member_architecture
        self.member_arguments = dict(member_arguments or {})
        self.members = nn.ModuleList([build_classifier(member_architecture, **self.member_arguments)
                                      for _ in range(int(n_members))])

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """(B, classes): log of the mean of the members' softmax probabilities."""
        p = torch.stack([torch.softmax(m(x, *args, **kwargs).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(1e-12))

    def embed(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The members' embeddings side by side (B, n_members x embedding width)."""
        return torch.cat([m.embed(x, *args, **kwargs) for m in self.members], dim=1)

    @property
    def classifier(self) -> "EnsembleHead":
        """The members' classification layers as one head on :meth:`embed`'s output (members of
        :class:`EmbeddingNet`): ``softmax(classifier(embed(x)))`` is the ensemble's probability, as for one
        network, so a sibling ensemble trained on the same trunks can be run on this one's embedding."""
        return EnsembleHead([m.classifier for m in self.members], [m.embedding_dim for m in self.members])

    def feature_layers(self) -> Dict[str, list]:
        """key → [each member's target layer for that key]."""
        out: Dict[str, list] = {}
        for m in self.members:
            for k, layer in m.feature_layers().items():
                out.setdefault(k, []).append(layer)
        return out

    def config(self) -> Dict[str, Any]:
        return {"architecture": "EnsembleNet",
                "arguments": {"member_architecture": self.member_architecture,
                              "member_arguments": dict(self.member_arguments), "n_members": len(self.members)}}


class EnsembleHead(nn.Module):
    """Classification layers of an ensemble's members applied to their embeddings side by side (the output of
    :meth:`EnsembleNet.embed`): the log of the mean of their softmax probabilities, like :meth:`EnsembleNet.forward`.
    It holds the members' own layers, not copies."""

    def __init__(self, heads: Sequence[nn.Module], widths: Sequence[int]) -> None:
        super().__init__()
        if len(heads) != len(widths) or not heads:
            raise ValueError("one embedding width per head, and at least one head")
        self.heads = nn.ModuleList(heads)
        self.widths = [int(w) for w in widths]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[1] != sum(self.widths):
            raise ValueError(f"expected embeddings {sum(self.widths)} wide, got {feats.shape[1]}")
        chunks = torch.split(feats, self.widths, dim=1)
        p = torch.stack([torch.softmax(h(c).float(), dim=1) for h, c in zip(self.heads, chunks)]).mean(0)
        return torch.log(p.clamp_min(1e-12))


# ---------------------------------------------------------------------------- inference helpers
@dataclass
class FramePrediction:
    """Per-lesion result of :func:`predict_frames`; ``float(pred)`` is the probability."""

    probability: float
    frame_probabilities: np.ndarray = field(repr=False)
    threshold: float = 0.5
    malignant: bool = False

    def __float__(self) -> float:
        return self.probability


def _n_frames(frames: PlaneInput) -> int:
    if isinstance(frames, Mapping):
        sizes = {int(t.shape[0]) for t in frames.values() if t is not None}
        if len(sizes) != 1:
            raise ValueError(f"planes have different numbers of frames {sorted(sizes)}")
        return sizes.pop()
    return int(frames.shape[0])


def _batches(frames: PlaneInput, batch_size: int) -> Iterator[PlaneInput]:
    n = _n_frames(frames)
    for start in range(0, n, batch_size):
        if isinstance(frames, Mapping):
            yield {p: (t[start : start + batch_size] if t is not None else None) for p, t in frames.items()}
        else:
            yield frames[start : start + batch_size]


def _as_tensor(frames: Any) -> PlaneInput:
    def one(t: Any) -> torch.Tensor:
        return (t if torch.is_tensor(t) else torch.as_tensor(np.asarray(t))).float()

    if isinstance(frames, Mapping):
        return {p: (None if t is None else one(t)) for p, t in frames.items()}
    return one(frames)


TTA: Tuple[str, ...] = ("hflip",)


def _hflip(frames: PlaneInput) -> PlaneInput:
    """Mirror left-right (the last axis); dict inputs plane by plane."""
    if isinstance(frames, Mapping):
        return {p: (None if t is None else torch.flip(t, dims=(-1,))) for p, t in frames.items()}
    return torch.flip(frames, dims=(-1,))


def _cat_views(views: Sequence[PlaneInput]) -> PlaneInput:
    """Several inputs of one layout as one batch (dicts plane by plane)."""
    if len(views) == 1:
        return views[0]
    if isinstance(views[0], Mapping):
        return {p: (None if views[0][p] is None else torch.cat([v[p] for v in views])) for p in views[0]}
    return torch.cat(list(views))


def predict_frames(
    model: nn.Module,
    frames: Any,
    threshold: float = 0.5,
    batch_size: int = 16,
    positive_index: int = 1,
    tta: Sequence[str] = (),
) -> FramePrediction:
    """Probability of the positive class for one lesion seen in several frames.

    ``frames``: (N, C, H, W) for :class:`EmbeddingNet`; (N, 3, C, H, W), a dict plane → (N, C, H, W) or
    (N, C, H, W) for :class:`ThreePlaneFusion`.  The model runs in eval mode without gradients (its
    training flag is restored); P = mean over frames of softmax(logits)[positive_index]; malignant when
    P >= threshold.

    ``tta``: test-time augmentation a bundle declares (``input.test_time_augmentation``).  ``"hflip"`` also
    classifies every frame mirrored left-right (each plane of a dict input mirrored along its width) and
    takes the mean of the two probabilities as the frame's probability.
    """
    (pred,) = _predict_views(model, [nn.Identity()], frames, [threshold], batch_size, positive_index, tta)
    return pred


def predict_frames_shared(
    model: "EmbeddingNet",
    heads: Sequence[nn.Module],
    frames: Any,
    thresholds: Sequence[float],
    batch_size: int = 16,
    tta: Sequence[str] = (),
    embeddings: Optional[List[torch.Tensor]] = None,
) -> List[FramePrediction]:
    """:func:`predict_frames` for several classification layers on one trunk: the embedding of every frame (and
    its mirror) is computed once and each head in ``heads`` maps it to its own logits.  With ``model``'s own
    ``classifier`` among the heads, its prediction equals ``predict_frames(model, ...)``.  For two models trained on
    one trunk (the malignancy and risk models), this halves the work.  A list given as ``embeddings`` receives
    the frames' own embeddings (not the mirrors'), batch by batch: ``model.embed(frames)`` without another pass."""
    if len(heads) != len(thresholds):
        raise ValueError("one threshold per head")
    return _predict_views(model.embed, list(heads), frames, list(thresholds), batch_size, 1, tta, eval_of=model,
                          keep=embeddings)


def _predict_views(features: Any, heads: Sequence[nn.Module], frames: Any, thresholds: Sequence[float],
                   batch_size: int, positive_index: int, tta: Sequence[str], eval_of: Optional[nn.Module] = None,
                   keep: Optional[List[torch.Tensor]] = None) -> List[FramePrediction]:
    unknown = [t for t in tta if t not in TTA]
    if unknown:
        raise ModelBundleError(f"The model asks for the test-time augmentation {unknown[0]!r}, which this BreastDLR "
                               f"does not know (known: {', '.join(TTA)}); update BreastDLR or use a matching model.")
    for threshold in thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    frames = _as_tensor(frames)
    if _n_frames(frames) == 0:
        raise ValueError("no frame to classify")
    modules = [m for m in [eval_of if eval_of is not None else features, *heads] if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        probs: List[List[torch.Tensor]] = [[] for _ in heads]
        with torch.no_grad():
            for batch in _batches(frames, max(1, int(batch_size))):
                views = [batch] + [_hflip(batch) for t in tta if t == "hflip"]
                n = _n_frames(batch)
                feats = features(_cat_views(views))                                 # one call for all views
                if keep is not None:
                    keep.append(feats[:n])
                for h, head in enumerate(heads):
                    p = torch.softmax(head(feats).float(), dim=1)[:, positive_index]
                    probs[h].append(p.view(len(views), n).mean(0))
    finally:
        for m, t in zip(modules, was_training):
            m.train(t)
    out = []
    for h, threshold in enumerate(thresholds):
        frame_p = torch.cat(probs[h]).cpu().numpy().astype(np.float64)
        p = float(frame_p.mean())
        out.append(FramePrediction(probability=p, frame_probabilities=frame_p, threshold=float(threshold),
                                   malignant=p >= threshold))
    return out


# ---------------------------------------------------------------------------- registry
ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "ThreePlaneFusion": ThreePlaneFusion,
    "EmbeddingNet": EmbeddingNet,
    "EnsembleNet": EnsembleNet,
}


def build_classifier(arch: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised network from a manifest's ``architecture`` and ``arguments``."""
    if arch not in ARCHITECTURES:
        raise ModelBundleError(
            f"The model bundle asks for the classifier {arch!r}, which this BreastDLR version does not know "
            f"(known: {', '.join(ARCHITECTURES)}); update BreastDLR or use a matching bundle."
        )
    try:
        return ARCHITECTURES[arch](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelBundleError(
            f"The model bundle's arguments for {arch} are not valid ({exc}); the bundle does not match this code."
        ) from exc
