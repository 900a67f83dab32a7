"""Models seen as four stages and a classifier head, with explicit stage outputs.

Every model the trainer uses is a :class:`StagedNet`: ``net(x)`` returns ``(feats, logits)`` where
``feats`` are the outputs of the four stages (``[B, C_i, H_i, W_i]``, empty when the model is used
for its logits only). Features come from the models' own structure, never from forward hooks:

* the built-in digits networks run their stages one after the other;
* torchvision ResNets (resnet*, resnext*, wide_resnet*) are split at ``layer1`` .. ``layer4``;
* other torchvision models go through ``torchvision.models.feature_extraction.
  create_feature_extractor`` at the last block of each of the four deepest resolutions of their
  ``features`` sequence (MobileNet, EfficientNet, ConvNeXt, VGG, ...) or at RegNet's
  ``trunk_output.block1..4``.

``blocks`` (the four stages and the head as separate modules, the split neighbourhood distillation
trains) exists for the built-in networks and the ResNets.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BUILTIN_STUDENT, BUILTIN_TEACHER, ConfigError

# Built-in networks for the 1x8x8 digits: (stage widths, residual units after each stage's first
# convolution). The student keeps the teacher's stage widths (so every method, neighbourhood
# distillation included, can pair their stages) and is 3x shallower: 4 convolutions against 12.
BUILTIN = {
    BUILTIN_TEACHER: ((32, 64, 64, 128), 1),
    BUILTIN_STUDENT: ((32, 64, 64, 128), 0),
}


class StagedNet(nn.Module):
    """A classifier as four stages and a head. ``forward(x) -> (feats, logits)``."""

    num_classes: int
    with_features: bool

    def blocks(self) -> list[nn.Module] | None:
        """The stages and the head as five modules, chained ``head(s4(s3(s2(s1(x)))))``."""
        return None

    def weights(self) -> dict[str, torch.Tensor]:
        """State dict in the model's own key names (torchvision names for torchvision models)."""
        return self.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_matching(self, state, source, self.num_classes)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(channels, channels, 1),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class DigitsNet(StagedNet):
    """Four stages at 8x8, 4x4, 4x4, 2x2: a 3x3 conv-BN-ReLU (stride 2 into stages 2 and 4)
    followed by ``units`` residual units, then global average pooling and a linear classifier."""

    def __init__(
        self, widths: tuple[int, ...], units: int, num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for width, stride in zip(widths, (1, 2, 1, 2), strict=True):
            stages.append(
                nn.Sequential(
                    _conv_bn_relu(cin, width, stride), *(_Residual(width) for _ in range(units))
                )
            )
            cin = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )
        self.num_classes = num_classes
        self.with_features = True

    def blocks(self) -> list[nn.Module]:
        return [*self.stages, self.head]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats, self.head(x)


class TorchvisionNet(StagedNet):
    """A torchvision classification model; stage outputs when ``with_features``."""

    def __init__(self, model: nn.Module, name: str, num_classes: int, with_features: bool,
                 probe_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.with_features = with_features
        self._resnet = with_features and _is_resnet(model)
        if not with_features or self._resnet:
            self.model = model
        else:
            self.model = _feature_extractor(model, name, probe_shape)

    def blocks(self) -> list[nn.Module] | None:
        if not self._resnet:
            return None
        m = self.model
        return [
            nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1),
            m.layer2,
            m.layer3,
            nn.Sequential(m.layer4),
            nn.Sequential(m.avgpool, nn.Flatten(1), m.fc),
        ]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self.with_features:
            return [], self.model(x)
        if self._resnet:
            m = self.model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            feats = []
            for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
                x = layer(x)
                feats.append(x)
            return feats, m.fc(torch.flatten(m.avgpool(x), 1))
        out = self.model(x)
        return [out[f"stage{i}"] for i in range(1, 5)], out["logits"]

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_matching(self.model, state, source, self.num_classes)


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool", "layer4", "avgpool", "fc"))


def _feature_extractor(model: nn.Module, name: str, probe_shape: tuple[int, ...]) -> nn.Module:
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    stage_nodes = _stage_nodes(model, name, probe_shape)
    train_nodes, eval_nodes = get_graph_node_names(model)
    stages = {node: f"stage{i + 1}" for i, node in enumerate(stage_nodes)}
    return create_feature_extractor(
        model,
        train_return_nodes={**stages, train_nodes[-1]: "logits"},
        eval_return_nodes={**stages, eval_nodes[-1]: "logits"},
    )


def _stage_nodes(model: nn.Module, name: str, probe_shape: tuple[int, ...]) -> list[str]:
    """Module names of the four stage outputs: RegNet's trunk blocks, or the last block of each
    of the four deepest resolutions of a ``features`` sequence (found with one probe forward)."""
    trunk = getattr(model, "trunk_output", None)
    if trunk is not None and all(hasattr(trunk, f"block{i}") for i in range(1, 5)):
        return [f"trunk_output.block{i}" for i in range(1, 5)]
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ConfigError(
            f"model {name!r}: the feature-based methods need its stage outputs, and fastkd knows "
            "them for ResNets, RegNets and models with a `features` sequence only; use a logit "
            "method (scratch, kd, topk) or another model"
        )
    was_training = model.training
    model.eval()
    sizes = []
    with torch.no_grad():
        x = torch.zeros(probe_shape)
        for block in features:
            x = block(x)
            sizes.append(tuple(x.shape[-2:]) if x.dim() == 4 else None)
    model.train(was_training)
    last_at: dict[tuple[int, int], int] = {}
    for i, size in enumerate(sizes):
        if size is not None:
            last_at[size] = i
    ends = sorted(last_at.values())
    if len(ends) < 4:
        raise ConfigError(
            f"model {name!r} has fewer than 4 resolutions at input {tuple(probe_shape[-2:])}; "
            "use a larger --image-size"
        )
    return [f"features.{i}" for i in ends[-4:]]


def load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, num_classes: int
) -> None:
    """``model.load_state_dict(state)`` with clear errors for class-count and shape mismatches."""
    own = model.state_dict()
    state = _strip_prefix(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not fit the model: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
            f"{', ...' if len(unexpected) > 3 else ''})"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        last = [k for k in wrong if own[k].dim() >= 1 and own[k].shape[0] == num_classes]
        if last and state[last[0]].dim() >= 1:
            raise ConfigError(
                f"{source}: the weights classify {state[last[0]].shape[0]} classes but the data "
                f"has {num_classes} (layer {last[0]})"
            )
        k = wrong[0]
        raise ConfigError(
            f"{source}: weights do not fit the model: {k} has shape {tuple(state[k].shape)}, "
            f"the model expects {tuple(own[k].shape)}"
        )
    model.load_state_dict(state)


def _strip_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict:
    """Drops a wrapper prefix ('module.' from DDP, '_orig_mod.' from torch.compile)."""
    for prefix in ("module.", "_orig_mod.", "model."):
        if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in own
        ):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str, embedded: bool, role: str) -> None:
    """Raises ConfigError for a model name that cannot be built for this data."""
    if embedded:
        if name not in BUILTIN:
            raise ConfigError(
                f"--{role} {name!r}: on the embedded digits the models are the built-in "
                f"{', '.join(BUILTIN)}; torchvision models need --data"
            )
        return
    if name in BUILTIN:
        raise ConfigError(f"--{role} {name!r} is built for the 8x8 digits; with --data use a "
                          "torchvision model")
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"--{role}: unknown torchvision classification model {name!r}{hint}")


def build_model(
    name: str, num_classes: int, *, with_features: bool, input_shape: tuple[int, int, int]
) -> StagedNet:
    """A freshly initialised model (random weights; nothing is downloaded)."""
    if name in BUILTIN:
        widths, units = BUILTIN[name]
        return DigitsNet(widths, units, num_classes, input_shape[0])
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return TorchvisionNet(model, name, num_classes, with_features, (1, *input_shape))


def stage_shapes(net: StagedNet, input_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """Shapes ``(C, H, W)`` of the four stage outputs for one input of ``input_shape``."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        feats, _ = net(torch.zeros(2, *input_shape))
    net.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]
