"""Observation encoder: per camera ResNet-18 -> spatial softmax -> Linear, plus low-dim state.

Frames are encoded one by one (a frame's features do not depend on the rest of the window),
which is what lets inference cache the features of a frame shared by consecutive windows.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig, PolicyConfig
from .resnet import ResNet18Trunk

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpatialSoftmax(nn.Module):
    """Keypoints as the expected (x, y) of a softmax over each feature map (Levine et al.)."""

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int):
        super().__init__()
        self.nets = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        # x varies along the width, y along the height, both in [-1, 1]
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width),
                                indexing="ij")
        self.register_buffer("pos_grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1),
                             persistent=False)  # (H*W, 2)
        self.num_keypoints = num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.nets(x).flatten(2)  # (B, K, H*W)
        attention = torch.softmax(feat, dim=-1)
        return (attention @ self.pos_grid).flatten(1)  # (B, K*2): x0, y0, x1, y1, ...


class CameraEncoder(nn.Module):
    def __init__(self, enc: EncoderConfig, in_height: int, in_width: int):
        super().__init__()
        self.backbone = ResNet18Trunk(enc.norm, enc.width)
        h, w = ResNet18Trunk.output_size(in_height, in_width)
        if enc.pool == "avg":  # global average pool, no projection (feature_dim = channels)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.out = nn.Identity()
        else:
            self.pool = SpatialSoftmax(self.backbone.out_channels, h, w, enc.num_keypoints)
            self.out = nn.Linear(enc.num_keypoints * 2, enc.feature_dim)
        self.relu = enc.feature_activation == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.pool(self.backbone(x)))
        return torch.relu(y) if self.relu else y


class ObsEncoder(nn.Module):
    """uint8 RGB frames per camera -> per-frame feature vector (all cameras concatenated)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        enc = cfg.encoder
        self.enc = enc
        self.camera_names = cfg.camera_names
        self.crop = tuple(enc.crop_shape) if enc.crop_shape is not None else None
        sizes = {c.name: (c.height, c.width) for c in cfg.cameras}
        in_hw = {n: (self.crop if self.crop else sizes[n]) for n in self.camera_names}
        if enc.shared and self.camera_names:
            first = in_hw[self.camera_names[0]]
            for n in self.camera_names:
                if in_hw[n] != first:
                    raise ValueError("a shared encoder needs every camera at the same size")
            self.encoders = nn.ModuleList([CameraEncoder(enc, *first)])
        else:
            self.encoders = nn.ModuleList([CameraEncoder(enc, *in_hw[n]) for n in self.camera_names])
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if enc.image_norm == "imagenet" else ((0.0,) * 3, (1.0,) * 3)
        if enc.image_norm == "custom":
            mean, std = tuple(enc.image_mean), tuple(enc.image_std)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        offset = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        if enc.image_norm == "symmetric":
            scale, offset = scale * 2.0, offset - 1.0
        # one affine map from uint8 to the backbone's input range
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_offset", offset, persistent=False)

    @property
    def feature_dim(self) -> int:
        return len(self.camera_names) * self.enc.feature_dim

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop is None:
            return x
        ch, cw = self.crop
        h, w = x.shape[-2:]
        if self.training and self.enc.random_crop:
            # an independent random crop for each frame, as the reference CropRandomizer
            n = x.shape[0]
            tops = torch.randint(0, h - ch + 1, (n,), device=x.device)
            lefts = torch.randint(0, w - cw + 1, (n,), device=x.device)
            rows = (tops[:, None] + torch.arange(ch, device=x.device)[None])[:, None, :, None]
            cols = (lefts[:, None] + torch.arange(cw, device=x.device)[None])[:, None, None, :]
            idx = torch.arange(n, device=x.device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            return x[idx, chan, rows, cols]
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top:top + ch, left:left + cw]

    def encode_camera(self, name: str, frames: torch.Tensor) -> torch.Tensor:
        """frames: uint8 (N, H, W, 3) RGB -> (N, feature_dim of one camera)."""
        x = frames.permute(0, 3, 1, 2).to(self.pixel_scale.dtype)
        x = self._crop(x) * self.pixel_scale + self.pixel_offset
        i = 0 if self.enc.shared else self.camera_names.index(name)
        return self.encoders[i](x)

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """images: camera -> uint8 (N, H, W, 3) -> (N, feature_dim), cameras in config order."""
        return torch.cat([self.encode_camera(n, images[n]) for n in self.camera_names], dim=-1)
