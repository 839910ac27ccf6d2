"""DenseNet-BC (Huang et al., CVPR 2017) as in torchvision: the CheXNet backbone (Rajpurkar 2017).

Layer names and parameter shapes follow torchvision's `densenet121` (`conv0`, `norm0`,
`denseblock{i}/denselayer{j}/{norm1,conv1,norm2,conv2}`, `transition{i}/{norm,conv}`, `norm5`,
`classifier`), so `cxrjax.models.torch_import` maps a torchvision `state_dict` one to one and
`DenseNet121(num_classes=1000)` on 3 channels has torchvision's 7,978,856 parameters.

Inputs are NHWC float images with 1 or 3 channels (inferred). Torchvision's ImageNet weights expect
RGB in [0, 1] normalised with the ImageNet mean/std; a model trained from scratch takes whatever
normalisation its input pipeline applies. Outputs are float32 logits (no sigmoid/softmax), also when
computing in bfloat16.

BatchNorm, the 1x1 convolutions and the pooling come from `cxrjax.models.cpu_friendly` (flax's
variables and numerics, in forms XLA's CPU backend runs 1.5-7x faster). BatchNorm
uses torchvision's constants: torch `momentum=0.1` is flax `momentum=0.9` (flax keeps
`momentum * running + (1 - momentum) * batch`), `epsilon=1e-5`. One difference remains: torch
updates `running_var` with the unbiased batch variance, flax with the biased one (a factor
n / (n - 1), n = batch * height * width, negligible at CXR batch sizes).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cxrjax.models import cpu_friendly

Dtype = Any

# torchvision initialises convs with kaiming_normal_ (fan_in, gain sqrt(2), untruncated) and keeps
# nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with zero bias.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

STEMS = ("imagenet", "small")


class _Module(nn.Module, kw_only=True):
    """What every DenseNet module shares: BatchNorm constants and dtypes (keyword-only fields,
    handed down with `shared()`), and torchvision's BN and conv layers built from them."""

    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def shared(self) -> dict[str, Any]:
        """The shared fields, for the submodules this module builds."""
        return {name: getattr(self, name) for name in _SHARED}

    def norm(self, name: str, train: bool) -> cpu_friendly.BatchNorm:
        return cpu_friendly.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def conv(self, features: int, kernel: int, name: str, stride: int = 1) -> nn.Module:
        if kernel == 1 and stride == 1:
            return cpu_friendly.PointwiseConv(
                features,
                kernel_init=conv_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )
        # torchvision pads 7x7 by 3 and 3x3 by 1 on every side; "SAME" would pad 7x7/2
        # asymmetrically.
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


_SHARED = ("bn_momentum", "bn_epsilon", "dtype", "param_dtype")


class DenseLayer(_Module):
    """BN-ReLU-Conv1x1 (bottleneck), BN-ReLU-Conv3x3; returns the input plus `growth_rate` new maps.

    `train` is positional (not keyword-only) so `nn.remat(DenseLayer, static_argnums=(2,))` can
    treat it as static: BatchNorm's Python branch on it must not be traced.
    """

    growth_rate: int
    bn_size: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(self.norm("norm1", train)(x))
        y = self.conv(self.bn_size * self.growth_rate, 1, "conv1")(y)
        y = nn.relu(self.norm("norm2", train)(y))
        y = self.conv(self.growth_rate, 3, "conv2")(y)
        if self.dropout_rate > 0:
            # torchvision's drop_rate: dropout on the new feature maps only.
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseBlock(_Module):
    """`num_layers` dense layers, each seeing the concatenation of all earlier feature maps."""

    num_layers: int
    growth_rate: int
    bn_size: int
    dropout_rate: float = 0.0
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # static_argnums counts `self` as 0, so (x, train) are 1 and 2: `train` stays a Python bool.
        layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
        for j in range(self.num_layers):
            x = layer_cls(
                growth_rate=self.growth_rate,
                bn_size=self.bn_size,
                dropout_rate=self.dropout_rate,
                name=f"denselayer{j + 1}",
                **self.shared(),
            )(x, train)
        return x


class Transition(_Module):
    """BN-ReLU-Conv1x1 to `features` maps, then 2x2 average pooling (stride 2)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(self.norm("norm", train)(x))
        y = self.conv(self.features, 1, "conv")(y)
        return cpu_friendly.avg_pool_2x2(y)


class DenseNet(_Module):
    """DenseNet-BC; the defaults are DenseNet121's, every hyperparameter is a field.

    Attributes:
      num_classes: logits per image (1000 for ImageNet, 14 for CheXNet's NIH labels).
      growth_rate: feature maps each dense layer adds (k in the paper).
      block_config: dense layers per dense block.
      num_init_features: stem output channels.
      bn_size: bottleneck width as a multiple of `growth_rate`.
      compression: transition output channels / input channels (theta in the paper).
      dropout_rate: dropout after each dense layer's 3x3 conv (torchvision's `drop_rate`); needs
        a 'dropout' rng when `train=True` and `dropout_rate > 0`.
      stem: "imagenet" (7x7/2 conv, BN-ReLU, 3x3/2 max-pool: input / 4, as torchvision) or
        "small" (3x3/1 conv only, as the paper's CIFAR DenseNet-BC, whose first dense layer
        starts with BN-ReLU) for inputs of 64 px or less, where /4 would leave too little.
      remat: recompute each dense layer in the backward pass instead of storing its activations
        (the concatenations dominate DenseNet's memory), like torchvision's `memory_efficient`.
      bn_momentum, bn_epsilon: flax BatchNorm constants (see the module docstring).
      dtype: compute dtype (e.g. jnp.bfloat16); logits and features are returned as float32.
      param_dtype: parameter dtype (keep float32 for training).
    """

    num_classes: int = 1000
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    dropout_rate: float = 0.0
    stem: str = "imagenet"
    remat: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits [B, num_classes] float32; with return_features, (logits, features [B, C])."""
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = self.conv(self.num_init_features, 7, "conv0", stride=2)(x)
            x = nn.relu(self.norm("norm0", train)(x))
            # Padding with -inf, as torch's MaxPool2d(3, 2, padding=1).
            x = cpu_friendly.max_pool_3x3_s2(x)
        else:
            x = self.conv(self.num_init_features, 3, "conv0")(x)

        num_features = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            x = DenseBlock(
                num_layers=num_layers,
                growth_rate=self.growth_rate,
                bn_size=self.bn_size,
                dropout_rate=self.dropout_rate,
                remat=self.remat,
                name=f"denseblock{i + 1}",
                **self.shared(),
            )(x, train)
            num_features += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                num_features = int(num_features * self.compression)
                x = Transition(num_features, name=f"transition{i + 1}", **self.shared())(x, train)

        x = nn.relu(self.norm("norm5", train)(x))
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C] global average pool
        logits = nn.Dense(
            self.num_classes,
            kernel_init=dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(features)
        logits = logits.astype(jnp.float32)
        return (logits, features) if return_features else logits

    def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Penultimate pooled features [B, C] float32 (1024 for DenseNet121): a feature extractor.

        Use as `model.apply(variables, x, method="features")`.
        """
        return self(x, train=train, return_features=True)[1]

    @property
    def num_features(self) -> int:
        """Channels of the pooled features (1024 for DenseNet121)."""
        n = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            n += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                n = int(n * self.compression)
        return n


class DenseNet121(DenseNet):
    """DenseNet121 (k=32, blocks 6-12-24-16, 64 stem features): torchvision's and CheXNet's."""


class DenseNet169(DenseNet):
    """DenseNet169 (blocks 6-12-32-32)."""

    block_config: Sequence[int] = (6, 12, 32, 32)


class DenseNet201(DenseNet):
    """DenseNet201 (blocks 6-12-48-32)."""

    block_config: Sequence[int] = (6, 12, 48, 32)


class DenseNet121K12(DenseNet):
    """DenseNet121's depth (blocks 6-12-24-16) with growth 12 and 24 stem features, small stem.

    About 7x fewer FLOPs than DenseNet121: the CPU-sized classifier for the shipped 28 px data
    (the DenseNet-BC family of Huang et al. uses k = 12 for small images).
    """

    growth_rate: int = 12
    num_init_features: int = 24
    stem: str = "small"


class DenseNetTiny(DenseNet):
    """Two-block, small-stem DenseNet of the same code, for tests and `tiny` configs (28-64 px)."""

    growth_rate: int = 8
    block_config: Sequence[int] = (2, 2)
    num_init_features: int = 16
    bn_size: int = 2
    stem: str = "small"


# The hyperparameters a config spells out for every DenseNet (configs/classifier.py fills them
# from the named class's defaults; cxrjax.train.classifier.make_model reads them back).
FIELDS = (
    "growth_rate",
    "block_config",
    "num_init_features",
    "bn_size",
    "compression",
    "dropout_rate",
    "stem",
    "remat",
)

MODELS = {
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
    "densenet121_k12": DenseNet121K12,
    "densenet_tiny": DenseNetTiny,
}
