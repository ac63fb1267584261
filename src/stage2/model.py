"""Stage2Refiner: terratorch's Prithvi ViT encoder, conditioned on month and biome, with a light decoder.

terratorch is imported inside `Stage2Refiner.__init__`, so `import stage2` and the
"nothing to do" path never pay its ~10 s import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import CONF_DIR

# The learned "unknown" of each condition (SPEC 6): month 0 has an embedding row of its own (months
# 1-12 keep rows 1-12); biome 0 is the guide's "open water or unknown" code.
from .conditioning import UNKNOWN_BIOME, UNKNOWN_MONTH  # noqa: F401 - re-exported for model users

# Prithvi's per-band statistics are in reflectance x 10000; ours are reflectance in [0, 1].
_PRITHVI_BAND_INDEX = [0, 1, 2, 3]  # BLUE, GREEN, RED, NIR_NARROW in terratorch's PRETRAINED_BANDS
_MODEL_KEYS = ("name", "backbone", "decoder_channels", "refine_channels", "n_months", "n_biomes")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of (B, C, H, W) up to a multiple of `multiple`.

    Reflection (not zeros) keeps border statistics natural, so border pixels are refined like
    interior ones. The data pipeline pads each tile with this same function, so a tile's padded
    input is the same whether it runs alone or in a batch.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect")


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    return h + (-h) % multiple, w + (-w) % multiple


def safe_backbones() -> frozenset[str]:
    """The backbones a Stage2Refiner may build: Prithvi models of terratorch's own registry.

    Anything else (a `timm_hf-hub:<user>/<model>` name, another registry's model) could reach for
    the network or run code from elsewhere when built (SPEC 5).
    """
    from terratorch.models.backbones import prithvi_vit
    from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY

    return frozenset(n for n in prithvi_vit.prithvi_cfgs if n in TERRATORCH_BACKBONE_REGISTRY)


def check_backbone(name: Any) -> None:
    """ValueError unless `name` is one of safe_backbones()."""
    allowed = safe_backbones()
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"backbone {name!r} is not one of terratorch's Prithvi backbones {sorted(allowed)}")


class Stage2Refiner(nn.Module):
    """Refine a Stage 1 optical estimate: opt_v2 = clip(opt_v1 + delta, 0, 1).

    Encoder: terratorch's PrithviViT (from its backbone registry, `pretrained=False`) on the 4
    bands [B02, B03, B04, B08], normalised with Prithvi's own band statistics.

    Conditioning: learned month (12, plus an "unknown" month 0) and biome (16; biome 0 is
    "unknown") embeddings are *added to every patch token* after the positional embedding.
    Addition is the same mechanism Prithvi uses for its own temporal and location encodings, costs
    nothing per token, and the embeddings start at zero, so a pretrained encoder starts exactly
    where it was trained and learns the seasonal and biome shift from data. (FiLM would modulate
    every block and change the encoder's behaviour at init.)

    Decoder: a linear layer maps each token to a patch of `decoder_channels` feature pixels
    (pixel shuffle back to full resolution), which is concatenated with the normalised input and
    refined by two 3x3 convolutions into a 4-band delta. The residual form keeps the output
    close to the input unless the model has learned a correction.

    `forward` takes any H, W >= 16: it reflect-pads to a multiple of the patch size and crops back.

    `conditioning`: the months and biomes it was trained on (stage2.checkpoint's record, SPEC 6), or
    None for a new model or a checkpoint written without the record.
    """

    conditioning: dict[str, Any] | None = None

    def __init__(self, *, backbone: str, decoder_channels: int, refine_channels: int, n_months: int,
                 n_biomes: int, name: str | None = None) -> None:
        super().__init__()
        from terratorch.datasets import HLSBands
        from terratorch.models.backbones import prithvi_vit
        from terratorch.registry import BACKBONE_REGISTRY

        self.config: dict[str, Any] = {
            "name": name or backbone, "backbone": backbone, "decoder_channels": decoder_channels,
            "refine_channels": refine_channels, "n_months": n_months, "n_biomes": n_biomes,
        }
        check_backbone(backbone)
        bands = [HLSBands.BLUE, HLSBands.GREEN, HLSBands.RED, HLSBands.NIR_NARROW]
        self.encoder = BACKBONE_REGISTRY.build(backbone, pretrained=False, bands=bands, num_frames=1)
        cfg = prithvi_vit.prithvi_cfgs.get(backbone, {})
        mean = [cfg.get("mean", prithvi_vit.PRITHVI_V2_MEAN)[i] / 1e4 for i in _PRITHVI_BAND_INDEX]
        std = [cfg.get("std", prithvi_vit.PRITHVI_V2_STD)[i] / 1e4 for i in _PRITHVI_BAND_INDEX]
        # Explicitly on the CPU: load_model builds the model on the meta device, and these buffers
        # are not in the checkpoint, so they must hold real values from the start.
        self.register_buffer("band_mean", torch.tensor(mean, device="cpu").view(1, 4, 1, 1), persistent=False)
        self.register_buffer("band_std", torch.tensor(std, device="cpu").view(1, 4, 1, 1), persistent=False)

        self.patch_size = int(self.encoder.patch_embed.patch_size[-1])
        dim = int(self.encoder.embed_dim)
        # Row 0: the unknown month; row m: month m. Checkpoints written before the unknown row hold
        # n_months rows; _with_unknown_month gives them a zero row 0 on load, so months 1-12 are the
        # same rows as before (identical outputs).
        self.month_embed = nn.Embedding(n_months + 1, dim)
        self.register_load_state_dict_pre_hook(_with_unknown_month)
        self.biome_embed = nn.Embedding(n_biomes, dim)
        nn.init.zeros_(self.month_embed.weight)
        nn.init.zeros_(self.biome_embed.weight)

        p = self.patch_size
        self.to_pixels = nn.Linear(dim, decoder_channels * p * p)
        self.refine = nn.Sequential(
            nn.Conv2d(decoder_channels + 4, refine_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(refine_channels, 4, 3, padding=1),
        )
        # Start as a near-identity refiner: a small, non-zero delta.
        with torch.no_grad():
            self.refine[-1].weight.mul_(0.1)
            self.refine[-1].bias.zero_()
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ encoder
    def _pos_embed(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        """Prithvi's positional embedding resized to the grid, cached per (shape, device, dtype)."""
        key = (h, w, ref.device, ref.dtype)
        pos = self._pos_cache.get(key)
        if pos is None or self.training:
            pos = self.encoder.interpolate_pos_encoding((1, h, w)).to(ref.dtype)
            if not self.training:
                self._pos_cache[key] = pos
        return pos

    def encode(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) of a normalised, padded (B, 4, H, W) batch."""
        enc = self.encoder
        h, w = x.shape[-2:]
        tokens = enc.patch_embed(x.unsqueeze(2))               # (B, N, D)
        pos = self._pos_embed(h, w, tokens)
        cond = self.month_embed(month) + self.biome_embed(biome)  # (B, D); month 0, biome 0: unknown
        tokens = tokens + pos[:, 1:, :] + cond[:, None, :]
        cls = (enc.cls_token + pos[:, :1, :]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        for block in enc.blocks:
            tokens = block(tokens)
        return enc.norm(tokens)[:, 1:, :]

    # ------------------------------------------------------------------ full model
    def forward_padded(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        """Refine a batch whose H and W are already multiples of the patch size."""
        h, w = x.shape[-2:]
        xn = (x - self.band_mean) / self.band_std
        tokens = self.encode(xn, month.long(), biome.long())
        feat = self.to_pixels(tokens)                          # (B, N, C*p*p)
        delta = self.refine(self._decoder_input(feat, xn, h, w))
        return torch.clamp(x + delta.to(x.dtype).contiguous(), 0.0, 1.0)

    def _decoder_input(self, feat: torch.Tensor, xn: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[pixel-shuffled token features ; normalised input] as one channels-last (B, C+4, H, W) tensor.

        Why channels-last: the full-resolution 3x3 convolutions are a third of a 256 px tile's
        time, and oneDNN runs them 1.3x (batch 1) to 4x (batch 4) faster on channels-last input
        than on NCHW. Shuffling straight into a channels-last buffer also replaces the
        reshape + cat + layout copies with two strided copies. Same values as the NCHW form
        (within float rounding, ~1e-7).
        """
        b, p = feat.shape[0], self.patch_size
        gh, gw = h // p, w // p
        c = feat.shape[-1] // (p * p)
        buf = torch.empty((b, c + 4, h, w), dtype=feat.dtype, device=feat.device,
                          memory_format=torch.channels_last)
        # (B, N, C*p*p) -> (B, C, gh, p, gw, p), written into the channels-last buffer's first C channels
        buf[:, :c].unflatten(3, (gw, p)).unflatten(2, (gh, p)).copy_(
            feat.view(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5))
        buf[:, c:].copy_(xn)
        return buf

    def forward(self, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        """opt_v1 (B, 4, H, W) in [0, 1], month (B,) 1-12 (0: unknown), biome (B,) 0-15 (0: unknown)
        -> opt_v2 (B, 4, H, W)."""
        h, w = opt_v1.shape[-2:]
        if h < 16 or w < 16:
            raise ValueError(f"tiles must be at least 16x16 px, got {h}x{w}")
        out = self.forward_padded(pad_to_multiple(opt_v1, self.patch_size), month, biome)
        return out[..., :h, :w]

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the positional cache
        self._pos_cache = {}
        return super()._apply(fn, recurse)


def _with_unknown_month(module: Stage2Refiner, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: a month embedding without the unknown row (n_months rows, as written
    before it existed) gains a zero row 0, so months 1-12 keep their rows and outputs."""
    key = prefix + "month_embed.weight"
    weight = state.get(key)
    if weight is not None and weight.ndim == 2 and weight.shape[0] == module.month_embed.num_embeddings - 1:
        state[key] = torch.cat((weight.new_zeros(1, weight.shape[1]), weight))


def model_config(name_or_config: str | Mapping[str, Any]) -> dict[str, Any]:
    """A model config from a `conf/model/<name>.yaml` entry name, or the entry's contents as a dict."""
    if isinstance(name_or_config, str):
        path = CONF_DIR / "model" / f"{name_or_config}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
            raise ValueError(f"unknown model {name_or_config!r}; known: {known}")
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    else:
        cfg = dict(name_or_config)
        if not isinstance(cfg, dict):
            raise TypeError("model config must be a name or a mapping")
    unknown = set(cfg) - set(_MODEL_KEYS) - {"pretrained_path"}
    missing = [k for k in _MODEL_KEYS if k not in cfg and k != "name"]
    if unknown or missing:
        raise ValueError(f"model config: unknown keys {sorted(unknown)}, missing keys {missing}; expected "
                         f"{list(_MODEL_KEYS)} as in conf/model/*.yaml")
    return {k: cfg[k] for k in _MODEL_KEYS if k in cfg}


def build_model(name_or_config: str | Mapping[str, Any]) -> Stage2Refiner:
    """A new Stage2Refiner with fresh weights (nothing is downloaded), in eval mode."""
    return Stage2Refiner(**model_config(name_or_config)).eval()
