"""PyTorch peers of cxrjax's models, of the same shapes, for the side-by-side benchmarks.

  densenet_peer  torchvision's DenseNet with a cxrjax DenseNet class's fields, 1 input channel
             and our stem ("small": a 3x3/1 conv0 only; "imagenet": 7x7/2 conv0, BN, max-pool).
  pggan_peer  a PGGAN generator and discriminator written here (no package ships one of this
             shape): equalized learning rate, pixel norm, nearest upsampling, box downsampling,
             minibatch stddev, the AC-GAN head and the fade-in of `cxrjax.models.pggan`, with
             the same feature counts per resolution (`pggan.num_features`).
  unet_kwargs  the arguments of a diffusers `UNet2DModel` shaped like one of our UNet presets.

torch (and diffusers for the UNet) is imported inside the functions: importing this module
needs neither.
"""

from __future__ import annotations

import math

from cxrjax.models import densenet
from cxrjax.models import pggan as pggan_lib

NUM_CLASSES = 2
HE_GAIN = math.sqrt(2)


# ----------------------------------------------------------------------------- DenseNet
def densenet_peer(
    cls: type[densenet.DenseNet], *, stem: str, num_classes: int, remat: bool = False
):
    """torchvision's DenseNet with `cls`'s fields (ours has the same parameter count)."""
    import torch
    import torchvision

    if cls.compression != 0.5:
        raise ValueError("torchvision's DenseNet halves channels at transitions (compression 0.5)")
    net = torchvision.models.DenseNet(
        growth_rate=cls.growth_rate,
        block_config=tuple(cls.block_config),
        num_init_features=cls.num_init_features,
        bn_size=cls.bn_size,
        drop_rate=cls.dropout_rate,
        num_classes=num_classes,
        memory_efficient=remat,
    )
    features = net.features
    if stem == "imagenet":
        features.conv0 = torch.nn.Conv2d(1, cls.num_init_features, 7, 2, 3, bias=False)
    else:
        # Ours: a 3x3/1 conv only; the first dense layer starts with BN-ReLU.
        features.conv0 = torch.nn.Conv2d(1, cls.num_init_features, 3, 1, 1, bias=False)
        features.norm0 = torch.nn.Identity()
        features.relu0 = torch.nn.Identity()
        features.pool0 = torch.nn.Identity()
    torch.nn.init.kaiming_normal_(features.conv0.weight)  # torchvision's conv init
    return net


# ----------------------------------------------------------------------------- UNet
def unet_kwargs(preset: str, resolution: int, num_classes: int = NUM_CLASSES) -> dict:
    """`UNet2DModel` arguments with the shape of our UNet preset (read from its keywords)."""
    from cxrjax.models import unet

    fields = unet.UNet.__dataclass_fields__
    kw = {name: fields[name].default for name in fields if not name.startswith("_")}
    kw.update(getattr(unet, preset).keywords)
    levels = len(kw["ch_mult"])
    attn = [resolution // 2**i in kw["attn_resolutions"] for i in range(levels)]
    return dict(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(kw["ch"] * m for m in kw["ch_mult"]),
        layers_per_block=kw["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=kw["dropout"],
        num_class_embeds=num_classes + 1,
        norm_num_groups=kw["num_groups"],
        attention_head_dim=kw["ch"] * max(kw["ch_mult"]) // kw["num_heads"],  # one head, as ours
    )


# ----------------------------------------------------------------------------- PGGAN
def pggan_peer(
    *, max_resolution: int, fmap_base: int, fmap_max: int, num_classes: int, fmap_decay=1.0
):
    """(generator, discriminator) torch modules shaped like `pggan.Generator`/`Discriminator`.

    Both take `(x, labels, resolution, alpha)`; images are NCHW.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    def nf(stage: int) -> int:
        return pggan_lib.num_features(stage, fmap_base, fmap_decay, fmap_max)

    def lrelu(x):
        return F.leaky_relu(x, 0.2)

    def pixel_norm(x, dim=1):
        return x * torch.rsqrt(torch.mean(x * x, dim=dim, keepdim=True) + 1e-8)

    class EqConv(nn.Module):
        """Conv with weights ~ N(0, 1) scaled by gain / sqrt(fan_in) at run time."""

        def __init__(self, cin, cout, k, gain=HE_GAIN):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
            self.bias = nn.Parameter(torch.zeros(cout))
            self.scale, self.pad = gain / math.sqrt(cin * k * k), k // 2

        def forward(self, x):
            return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)

    class EqDense(nn.Module):
        def __init__(self, cin, cout, gain=HE_GAIN, bias=True):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin))
            self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
            self.scale = gain / math.sqrt(cin)

        def forward(self, x):
            return F.linear(x, self.weight * self.scale, self.bias)

    top_log2 = int(math.log2(max_resolution))
    latent = nf(0)

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def down(x):
        return F.avg_pool2d(x, 2)

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = EqDense(latent + num_classes, nf(1) * 16, math.sqrt(2) / 4, bias=False)
            self.stem_bias = nn.Parameter(torch.zeros(nf(1)))
            self.stem_conv = EqConv(nf(1), nf(1), 3)
            self.blocks = nn.ModuleList(
                nn.ModuleList([EqConv(nf(k - 2), nf(k - 1), 3), EqConv(nf(k - 1), nf(k - 1), 3)])
                for k in range(3, top_log2 + 1)
            )
            self.to_rgb = nn.ModuleList(
                EqConv(nf(k - 1), 1, 1, gain=1.0) for k in range(2, top_log2 + 1)
            )

        def forward(self, z, labels, resolution, alpha):
            top = int(math.log2(resolution))
            x = torch.cat([z, F.one_hot(labels, num_classes).to(z.dtype)], 1) if num_classes else z
            x = self.dense(pixel_norm(x))
            # Ours reshapes [B, 16 nf1] to NHWC [B, 4, 4, nf1].
            x = x.view(-1, 4, 4, nf(1)).permute(0, 3, 1, 2) + self.stem_bias.view(1, -1, 1, 1)
            h = pixel_norm(lrelu(self.stem_conv(pixel_norm(lrelu(x)))))
            h_prev = h
            for k in range(3, top + 1):
                conv0, conv1 = self.blocks[k - 3]
                h_prev, h = h, pixel_norm(lrelu(conv1(pixel_norm(lrelu(conv0(up(h)))))))
            images = self.to_rgb[top - 2](h)
            if top > 2:
                old = up(self.to_rgb[top - 3](h_prev))
                images = old * (1 - alpha) + images * alpha
            return images

    def minibatch_stddev(x, group=4):
        b, c, h, w = x.shape
        g = min(group, b)
        y = x.view(g, b // g, c, h, w)
        y = torch.sqrt(torch.mean((y - y.mean(0, keepdim=True)) ** 2, 0) + 1e-8)
        y = y.mean((1, 2, 3)).repeat(g).view(b, 1, 1, 1).expand(b, 1, h, w)
        return torch.cat([x, y], 1)

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.from_rgb = nn.ModuleList(EqConv(1, nf(k - 1), 1) for k in range(2, top_log2 + 1))
            self.blocks = nn.ModuleList(
                nn.ModuleList([EqConv(nf(k - 1), nf(k - 1), 3), EqConv(nf(k - 1), nf(k - 2), 3)])
                for k in range(3, top_log2 + 1)
            )
            self.head_conv = EqConv(nf(1) + 1, nf(1), 3)
            self.dense0 = EqDense(nf(1) * 16, nf(0))
            self.dense1 = EqDense(nf(0), 1 + num_classes, gain=1.0)

        def block(self, k, h):
            conv0, conv1 = self.blocks[k - 3]
            return down(lrelu(conv1(lrelu(conv0(h)))))

        def forward(self, images, labels, resolution, alpha):
            del labels
            top = int(math.log2(resolution))
            h = lrelu(self.from_rgb[top - 2](images))
            if top > 2:
                h = self.block(top, h)
                old = lrelu(self.from_rgb[top - 3](down(images)))
                h = old * (1 - alpha) + h * alpha
                for k in range(top - 1, 2, -1):
                    h = self.block(k, h)
            h = lrelu(self.head_conv(minibatch_stddev(h)))
            # Ours flattens NHWC: same features, another order (the weights are random here).
            out = self.dense1(lrelu(self.dense0(h.flatten(1))))
            return out[:, 0], out[:, 1:]

    return Generator(), Discriminator()
