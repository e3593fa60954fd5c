"""Dual-domain semantic generators (SemanticStyleGAN-style) and their two-branch discriminator.

Written from the papers (Karras et al., StyleGAN2, CVPR 2020; Shi et al., SemanticStyleGAN, CVPR 2022;
Zhang et al., SwiftAvatar, AAAI 2023), in the manner of rosinality's stylegan2-pytorch: small modules,
shapes in comments. B = batch, K = number of parts (training/common/parts.py), h = w = local_res, H = W = output.

Generator
  z [B, z_dim] --mapping--> w [B, w_dim]
  W+ [B, n_latent, w_dim] = [ base codes (n_base) | part 0 shape, part 0 texture | part 1 shape, ... ]
      base code 0 modulates the first layer of every local generator (shared coarse geometry/pose);
      base codes 1.. modulate the render net's layers (global appearance: lighting, colour balance);
      a part's shape code drives its shape layers and depth, its texture code its texture layers.
  local generators: per part, an MLP (modulated 1x1 layers) over Fourier features of an h x w coordinate
      grid -> depth [B, K, h, w] and features [B, K, F, h, w]. All K parts run as one batched einsum.
  fusion: masks = softmax over parts of the depths; fused = sum_k masks_k * features_k  [B, F, h, w]
  render net: modulated 3x3 convs with 2x upsampling up to H; skip outputs toRGB and toSeg at every
      resolution; segmentation logits = upsampled depths + the toSeg residual  [B, K, H, W].

Discriminator: an image branch (RGB) and a segmentation branch (K-channel part probabilities) of residual
  blocks, summed at ``fuse_res``; shared residual blocks down to 4x4, minibatch stddev, two dense layers.

Transparent parts: see ``mean_latents`` (the modified mean latent used to start inversions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gan_configs import GANConfig
from ..common.parts import NUM_PARTS, PART_IDS, TRANSPARENT_PARTS

SQRT2 = math.sqrt(2.0)


# ============================================================================================
# Equalised-learning-rate building blocks
# ============================================================================================

def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with the StyleGAN gain sqrt(2), keeping activations' variance."""
    return F.leaky_relu(x, 0.2) * SQRT2


class PixelNorm(nn.Module):
    def forward(self, x):                                     # [B, C]
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Dense layer whose weights are scaled at run time (equalised learning rate)."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul, self.activate = lr_mul, activate

    def forward(self, x):                                     # [B, in] -> [B, out]
        b = self.bias * self.lr_mul if self.bias is not None else None
        y = F.linear(x, self.weight * self.scale, b)
        return lrelu(y) if self.activate else y


class EqualConv2d(nn.Module):
    def __init__(self, in_ch, out_ch, kernel, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x):                                     # [B, in, H, W] -> [B, out, H, W]
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


# ============================================================================================
# Mapping network
# ============================================================================================

class MappingNetwork(nn.Module):
    def __init__(self, z_dim, w_dim, n_mlp, lr_mul=0.01):
        super().__init__()
        layers = [PixelNorm()]
        for i in range(n_mlp):
            layers.append(EqualLinear(z_dim if i == 0 else w_dim, w_dim, lr_mul=lr_mul, activate=True))
        self.net = nn.Sequential(*layers)

    def forward(self, z):                                     # [B, z_dim] -> [B, w_dim]
        return self.net(z)


# ============================================================================================
# Local generators: K small modulated MLPs over Fourier features, run as one batched einsum
# ============================================================================================

class PartModulatedLinear(nn.Module):
    """K modulated 1x1 layers, one per part, each with its own weights and its own style affine.

    x [B, K, in, N] (N = h*w positions), w [B, K, w_dim] -> [B, K, out, N]
    """

    def __init__(self, n_parts, in_ch, out_ch, w_dim, demodulate=True, activate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_parts, out_ch, in_ch))
        self.scale = 1.0 / math.sqrt(in_ch)
        self.affine = nn.Parameter(torch.randn(n_parts, in_ch, w_dim))
        self.affine_scale = 1.0 / math.sqrt(w_dim)
        self.affine_bias = nn.Parameter(torch.ones(n_parts, in_ch))      # styles start at 1
        self.bias = nn.Parameter(torch.zeros(n_parts, out_ch))
        self.demodulate, self.activate = demodulate, activate

    def forward(self, x, w):
        s = torch.einsum("kiw,bkw->bki", self.affine * self.affine_scale, w) + self.affine_bias  # [B,K,in]
        weight = self.weight * self.scale                                                     # [K,out,in]
        y = torch.einsum("koi,bkin->bkon", weight, x * s.unsqueeze(-1))                       # [B,K,out,N]
        if self.demodulate:
            d = torch.rsqrt(torch.einsum("koi,bki->bko", weight.pow(2), s.pow(2)) + 1e-8)   # [B,K,out]
            y = y * d.unsqueeze(-1)
        y = y + self.bias.unsqueeze(0).unsqueeze(-1)
        return lrelu(y) if self.activate else y


class PartLinear(nn.Module):
    """K plain 1x1 heads. x [B, K, in, N] -> [B, K, out, N]"""

    def __init__(self, n_parts, in_ch, out_ch):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_parts, out_ch, in_ch))
        self.bias = nn.Parameter(torch.zeros(n_parts, out_ch))
        self.scale = 1.0 / math.sqrt(in_ch)

    def forward(self, x):
        y = torch.einsum("koi,bkin->bkon", self.weight * self.scale, x)
        return y + self.bias.unsqueeze(0).unsqueeze(-1)


def fourier_grid(res: int, n_freq: int, seed: int = 1234, sigma: float = 2.0) -> torch.Tensor:
    """Fixed Fourier features of a res x res grid of pixel centres in [-1, 1]^2.

    Returns [2 * n_freq + 2, res * res]: sin and cos of random Gaussian frequencies, plus x and y.
    """
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(n_freq, 2, generator=g) * sigma                   # [n_freq, 2] cycles per unit
    t = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    coords = torch.stack([xx.reshape(-1), yy.reshape(-1)])               # [2, N]
    phase = 2 * math.pi * freqs @ coords                                   # [n_freq, N]
    return torch.cat([torch.sin(phase), torch.cos(phase), coords])        # [2 n_freq + 2, N]


class LocalGenerators(nn.Module):
    """One coordinate MLP per part.

    base layer (base code 0) -> shape layers (shape code) -> depth head
                             -> texture layers (texture code) -> feature head (modulated, no demod)
    """

    def __init__(self, cfg: GANConfig, n_parts: int = NUM_PARTS):
        super().__init__()
        self.res, self.n_parts = cfg.local_res, n_parts
        self.register_buffer("grid", fourier_grid(cfg.local_res, cfg.n_freq))   # [C_in, N]
        c_in, hid = self.grid.shape[0], cfg.local_hidden
        self.base = PartModulatedLinear(n_parts, c_in, hid, cfg.w_dim)
        self.shape_layers = nn.ModuleList(
            PartModulatedLinear(n_parts, hid, hid, cfg.w_dim) for _ in range(cfg.local_shape_layers))
        self.to_depth = PartLinear(n_parts, hid, 1)
        self.texture_layers = nn.ModuleList(
            PartModulatedLinear(n_parts, hid, hid, cfg.w_dim) for _ in range(cfg.local_texture_layers))
        self.to_feat = PartModulatedLinear(n_parts, hid, cfg.feat_dim, cfg.w_dim, demodulate=False,
                                           activate=False)

    def forward(self, w_base, w_shape, w_texture):
        """w_base [B, w_dim], w_shape/w_texture [B, K, w_dim] ->
        depths [B, K, h, w], features [B, K, F, h, w]"""
        b, k, r = w_base.shape[0], self.n_parts, self.res
        x = self.grid.expand(b, k, -1, -1)                                    # [B, K, C_in, N]
        x = self.base(x, w_base.unsqueeze(1).expand(-1, k, -1))               # [B, K, hid, N]
        for layer in self.shape_layers:
            x = layer(x, w_shape)
        depth = self.to_depth(x)                                               # [B, K, 1, N]
        for layer in self.texture_layers:
            x = layer(x, w_texture)
        feat = self.to_feat(x, w_texture)                                      # [B, K, F, N]
        return depth.view(b, k, r, r), feat.view(b, k, -1, r, r)


def fuse(depths: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """depths [B, K, h, w], feats [B, K, F, h, w] -> fused features [B, F, h, w], masks [B, K, h, w]"""
    masks = torch.softmax(depths, dim=1)
    return (masks.unsqueeze(2) * feats).sum(dim=1), masks


# ============================================================================================
# Render net: modulated convolutions (StyleGAN2), skip outputs for RGB and segmentation
# ============================================================================================

class ModulatedConv2d(nn.Module):
    """Modulated conv as input scaling -> conv with shared weights -> output demodulation.

    Mathematically the StyleGAN2 weight (de)modulation; on CPU it avoids grouped convolutions.
    x [B, in, H, W], w [B, w_dim] -> [B, out, H', W'] (H' = 2H when upsample)
    """

    def __init__(self, in_ch, out_ch, kernel, w_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel // 2

    def forward(self, x, w):
        s = self.affine(w)                                                     # [B, in]
        weight = self.weight * self.scale                                      # [out, in, k, k]
        x = x * s[:, :, None, None]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            d = torch.rsqrt(s.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)  # [B, out]
            y = y * d[:, :, None, None]
        return y


class StyledConv(nn.Module):
    """Modulated conv + per-pixel noise + bias + leaky ReLU."""

    def __init__(self, in_ch, out_ch, w_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w, noise=None):
        x = self.conv(x, w)                                                    # [B, out, H, W]
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, x.shape[2], x.shape[3]).normal_()
        x = x + self.noise_strength * noise
        return lrelu(x + self.bias[None, :, None, None])


class ToOutput(nn.Module):
    """Modulated 1x1 (no demodulation) to RGB or segmentation residual, added to the upsampled skip."""

    def __init__(self, in_ch, out_ch, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w, skip=None):
        y = self.conv(x, w) + self.bias[None, :, None, None]
        if skip is not None:
            y = y + F.interpolate(skip, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return y


class RenderNet(nn.Module):
    """fused features [B, F, h, w] -> rgb [B, 3, H, W], segmentation residual [B, K, H, W]

    One stage per entry of cfg.render_channels: (res, ch). The first stage (res = local_res) has two
    3x3 convs; each later one an upsampling conv and a conv. Every stage emits toRGB and toSeg.
    Styles: 2 base codes per stage (one per conv; the outputs use the stage's second code).
    """

    def __init__(self, cfg: GANConfig, n_parts: int = NUM_PARTS):
        super().__init__()
        stages = list(cfg.render_channels)
        if stages[0][0] != cfg.local_res or stages[-1][0] != cfg.resolution:
            raise ValueError(f"config {cfg.name}: render_channels must run from local_res "
                             f"{cfg.local_res} to resolution {cfg.resolution}")
        self.convs, self.to_rgb, self.to_seg = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = cfg.feat_dim
        for i, (res, ch) in enumerate(stages):
            if i > 0 and res != 2 * stages[i - 1][0]:
                raise ValueError(f"config {cfg.name}: render resolutions must double")
            self.convs.append(StyledConv(prev, ch, cfg.w_dim, upsample=i > 0))
            self.convs.append(StyledConv(ch, ch, cfg.w_dim))
            self.to_rgb.append(ToOutput(ch, 3, cfg.w_dim))
            self.to_seg.append(ToOutput(ch, n_parts, cfg.w_dim))
            prev = ch
        self.n_styles = 2 * len(stages)

    def forward(self, x, ws, noise=None):
        """ws [B, n_styles, w_dim]; noise: optional list of per-conv noise maps"""
        rgb = seg = None
        for i in range(len(self.to_rgb)):
            x = self.convs[2 * i](x, ws[:, 2 * i], None if noise is None else noise[2 * i])
            x = self.convs[2 * i + 1](x, ws[:, 2 * i + 1], None if noise is None else noise[2 * i + 1])
            rgb = self.to_rgb[i](x, ws[:, 2 * i + 1], rgb)
            seg = self.to_seg[i](x, ws[:, 2 * i + 1], seg)
        return rgb, seg


# ============================================================================================
# Generator
# ============================================================================================

class Generator(nn.Module):
    def __init__(self, cfg: GANConfig, n_parts: int = NUM_PARTS):
        super().__init__()
        self.cfg, self.n_parts = cfg, n_parts
        self.mapping = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.n_mlp, cfg.mapping_lr_mul)
        self.local = LocalGenerators(cfg, n_parts)
        self.render = RenderNet(cfg, n_parts)
        self.n_base = 1 + self.render.n_styles
        self.n_latent = self.n_base + 2 * n_parts

    # ---- latents ---------------------------------------------------------------------------
    def shape_index(self, part: int) -> int:
        return self.n_base + 2 * part

    def texture_index(self, part: int) -> int:
        return self.n_base + 2 * part + 1

    def map(self, z):                                          # [B, z_dim] -> [B, w_dim]
        return self.mapping(z)

    def broadcast(self, w):                                    # [B, w_dim] -> W+ [B, n_latent, w_dim]
        return w.unsqueeze(1).expand(-1, self.n_latent, -1)

    def mix(self, w1, w2, crossover):
        """W+ with codes [0, crossover) from w1 and [crossover, n_latent) from w2; crossover [B]"""
        idx = torch.arange(self.n_latent, device=w1.device)[None, :, None]
        return torch.where(idx < crossover[:, None, None], w1[:, None], w2[:, None])

    # ---- synthesis ---------------------------------------------------------------------------
    def local_forward(self, wp):
        """W+ [B, n_latent, w_dim] -> depths [B, K, h, w], part features [B, K, F, h, w]"""
        parts = wp[:, self.n_base:].reshape(wp.shape[0], self.n_parts, 2, -1)
        return self.local(wp[:, 0], parts[:, :, 0], parts[:, :, 1])

    def forward(self, wp, noise=None):
        """W+ [B, n_latent, w_dim] -> dict
            image [B, 3, H, W] (about [-1, 1]), seg [B, K, H, W] logits, depths [B, K, h, w] logits"""
        depths, feats = self.local_forward(wp)
        fused, _ = fuse(depths, feats)                                   # [B, F, h, w]
        rgb, seg_res = self.render(fused, wp[:, 1:self.n_base], noise)
        coarse = F.interpolate(depths, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return {"image": rgb, "seg": coarse + seg_res, "depths": depths}

    def sample(self, z, truncation=1.0, w_mean=None, noise=None):
        """z [B, z_dim] -> outputs of forward, with optional truncation toward w_mean [n_latent, w_dim]"""
        wp = self.broadcast(self.map(z))
        if truncation != 1.0 and w_mean is not None:
            wp = w_mean + truncation * (wp - w_mean)
        return self(wp, noise)

    # ---- mean latents (inversion start) --------------------------------------------------------
    def mapping_device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def mean_latents(self, n: int = 10_000, batch: int = 1000, seed: int = 0, min_coverage: float = 0.01,
                     min_samples: int = 20) -> dict:
        """The mean latent and the modified mean latent for transparent parts.

        SwiftAvatar starts GAN inversion from a mean latent and notes that transparent parts (eyeglasses)
        need a modified one: in the plain mean W+ the eyeglasses part's depth lies under the face almost
        everywhere, its softmax weight is ~0 and so is its gradient, and inversion of a photo with glasses
        rarely makes them appear. Our variant (as we read the paper): W+ mean everywhere except the
        transparent part's shape and texture codes, which are the mean w of the samples whose coarse
        segmentation shows that part on at least ``min_coverage`` of the grid (if fewer than
        ``min_samples`` such samples exist, the ``min_samples`` samples with the largest coverage).
        The other parts keep the plain mean, so the start is the average face, wearing average glasses.

        Returns {"w_mean": [n_latent, w_dim], "w_mean_transparent": [n_latent, w_dim],
                 "coverage": {part: (fraction of samples with the part, coverage of the modified mean)}}
        """
        g = torch.Generator().manual_seed(seed)
        ws, covers = [], []
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), self.cfg.z_dim, generator=g)
            w = self.map(z.to(self.mapping_device()))
            depths, _ = self.local_forward(self.broadcast(w))
            hard = depths.argmax(dim=1)                                          # [b, h, w]
            cov = torch.stack([(hard == k).float().mean(dim=(1, 2)) for k in range(self.n_parts)], 1)
            ws.append(w)
            covers.append(cov)
        w_all, cov_all = torch.cat(ws), torch.cat(covers)                         # [n, w_dim], [n, K]
        w_mean = w_all.mean(dim=0)
        wp_mean = w_mean.expand(self.n_latent, -1).clone()
        wp_mod = wp_mean.clone()
        report = {}
        for name in TRANSPARENT_PARTS:
            k = PART_IDS[name]
            have = cov_all[:, k] >= min_coverage
            if int(have.sum()) >= min_samples:
                w_part = w_all[have].mean(dim=0)
            else:
                w_part = w_all[cov_all[:, k].topk(min_samples).indices].mean(dim=0)
            wp_mod[self.shape_index(k)] = w_part
            wp_mod[self.texture_index(k)] = w_part
            d_mod, _ = self.local_forward(wp_mod[None])
            report[name] = (float(have.float().mean()), float((d_mod.argmax(1) == k).float().mean()))
        return {"w_mean": wp_mean, "w_mean_transparent": wp_mod, "coverage": report}


# ============================================================================================
# Discriminator: image branch + segmentation branch, fused, StyleGAN2 residual blocks
# ============================================================================================

class ConvAct(nn.Module):
    """(optional 2x average-pool) -> equalised conv -> bias + leaky ReLU (if activate)"""

    def __init__(self, in_ch, out_ch, kernel, downsample=False, activate=True):
        super().__init__()
        self.conv = EqualConv2d(in_ch, out_ch, kernel, bias=activate)
        self.downsample, self.activate = downsample, activate

    def forward(self, x):
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        x = self.conv(x)
        return lrelu(x) if self.activate else x


class ResBlock(nn.Module):
    """[B, in, H, W] -> [B, out, H/2, W/2]"""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = ConvAct(in_ch, in_ch, 3)
        self.conv2 = ConvAct(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvAct(in_ch, out_ch, 1, downsample=True, activate=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def minibatch_stddev(x, group: int):
    """Append the mean over features of the per-group stddev as one channel. [B,C,H,W] -> [B,C+1,H,W]"""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.view(g, b // g, c, h, w)
    y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8)                    # [B/g, C, H, W]
    y = y.mean(dim=(1, 2, 3)).view(b // g, 1, 1, 1).repeat(g, 1, h, w)     # [B, 1, H, W]
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """D(image [B, 3, H, W], seg [B, K, H, W] part probabilities) -> logits [B, 1]"""

    def __init__(self, cfg: GANConfig, n_parts: int = NUM_PARTS):
        super().__init__()
        ch = dict(cfg.d_channels)
        seg_ch = dict(cfg.d_seg_channels)
        res = cfg.resolution
        if res not in ch or 4 not in ch or cfg.fuse_res not in ch:
            raise ValueError(f"config {cfg.name}: d_channels needs {res}, {cfg.fuse_res} and 4")
        self.mbstd_group = cfg.mbstd_group
        # image branch: res -> fuse_res
        self.from_rgb = ConvAct(3, ch[res], 1)
        self.img_blocks = nn.Sequential(*[ResBlock(ch[r], ch[r // 2]) for r in _down(res, cfg.fuse_res)])
        # segmentation branch: res -> fuse_res, ending at the image branch's width
        seg_res = list(_down(res, cfg.fuse_res))
        seg_out = [seg_ch[r // 2] if r // 2 != cfg.fuse_res else ch[cfg.fuse_res] for r in seg_res]
        self.from_seg = ConvAct(n_parts, seg_ch[res], 1)
        self.seg_blocks = nn.Sequential(*[ResBlock(seg_ch[r], o) for r, o in zip(seg_res, seg_out)])
        # shared trunk: fuse_res -> 4
        self.blocks = nn.Sequential(*[ResBlock(ch[r], ch[r // 2]) for r in _down(cfg.fuse_res, 4)])
        self.final_conv = ConvAct(ch[4] + 1, ch[4], 3)
        self.final = nn.Sequential(EqualLinear(ch[4] * 16, ch[4], activate=True), EqualLinear(ch[4], 1))

    def forward(self, image, seg):
        x = self.img_blocks(self.from_rgb(image))                  # [B, C_f, fuse_res, fuse_res]
        s = self.seg_blocks(self.from_seg(seg))                    # [B, C_f, fuse_res, fuse_res]
        x = self.blocks((x + s) / SQRT2)                           # [B, C_4, 4, 4]
        x = self.final_conv(minibatch_stddev(x, self.mbstd_group))
        return self.final(x.flatten(1))                            # [B, 1]


def _down(start: int, stop: int):
    """Resolutions start, start/2, ... > stop (each one's block halves it)."""
    r = start
    while r > stop:
        yield r
        r //= 2


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
