"""``absvl demo``: a CPU smoke run of the top-down backbones on a generated two-object scene.

Until the VL trainer lands this shows the mechanics with randomly initialised weights: a
prior ξ taken from one object's first-pass tokens concentrates the AbSViT modulation
``α·clamp(cos(ξ, z_i), 0, 1)`` on that object, the second pass differs from the first, and
every backbone family runs at 224 px. It writes a PNG of the image and both priors' masks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .models.vision import count_params, create_backbone, estimate_macs
from .models.vision.topdown import prior_mask

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def two_object_scene(size: int = 224) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey canvas with a red square (left) and a blue square (right), plus their masks."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    left = np.zeros((size, size), dtype=bool)
    right = np.zeros((size, size), dtype=bool)
    s = size // 4
    left[s : 2 * s, s // 2 : s // 2 + s] = True
    right[2 * s : 3 * s, 2 * s + s // 2 : 3 * s + s // 2] = True
    image[left] = (220, 30, 30)
    image[right] = (30, 30, 220)
    return image, left, right


def _token_masks(mask: np.ndarray, patch: int) -> torch.Tensor:
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    return torch.from_numpy(mask.reshape(h, patch, w, patch).mean(axis=(1, 3)) > 0.5).flatten()


def _save_png(path: Path, image: np.ndarray, maps: list[np.ndarray]) -> None:
    size = image.shape[0]
    tiles = [image]
    for m in maps:
        m = (m - m.min()) / (m.max() - m.min() + 1e-8)
        heat = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.NEAREST))
        tiles.append(np.stack([heat, heat // 2, 255 - heat], axis=-1).astype(np.uint8))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


@torch.no_grad()
def run(out_dir: str | Path = "outputs/demo") -> dict[str, float]:
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, left, right = two_object_scene()
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - _MEAN) / _STD).unsqueeze(0)

    model = create_backbone("absvit_tiny_patch16_224", alpha=1.0).eval()
    out = model(x)
    z = out.bottom_up_tokens[0, 1:]
    on_left, on_right = _token_masks(left, 16), _token_masks(right, 16)
    results: dict[str, float] = {}
    masks = []
    print("AbSViT-Ti prior modulation α·clamp(cos(ξ, z_i), 0, 1), ξ = an object's mean first-pass token:")
    for name, target, other in (("red", on_left, on_right), ("blue", on_right, on_left)):
        xi = z[target].mean(0, keepdim=True)
        mask = prior_mask(out.bottom_up_tokens, xi)[0, 1:, 0]
        steered = model(x, xi=xi)
        change = (steered.tokens - steered.bottom_up_tokens).norm() / steered.bottom_up_tokens.norm()
        results[f"mask_{name}_on_target"] = mask[target].mean().item()
        results[f"mask_{name}_on_other"] = mask[other].mean().item()
        print(
            f"  ξ = {name:4s}: mean weight on the {name} object {mask[target].mean():.3f}, "
            f"on the other object {mask[other].mean():.3f}; second pass differs from the first by {change:.1%}"
        )
        masks.append(mask.reshape(out.grid_size).numpy())
    png = out_dir / "prior_masks.png"
    _save_png(png, image, masks)
    print(f"  wrote {png} (image | mask for ξ=red | mask for ξ=blue)")

    print("\nEvery family at 224 px (random weights):")
    for name in ("vit_tiny_patch16_224", "absvit_tiny_patch16_224", "vars_d_vit_tiny_patch16_224", "resnet50", "tdam_resnet50"):
        backbone = create_backbone(name).eval()
        feats = backbone(x)
        _, macs = estimate_macs(name)
        print(
            f"  {name:30s} params {count_params(backbone) / 1e6:6.2f}M  GMACs {macs / 1e9:5.2f}  "
            f"tokens {tuple(feats.tokens.shape)}  pooled {tuple(feats.pooled.shape)}"
        )
    print("Speed: scripts/bench_backbones.py (figures in BENCHMARKS.md).")
    return results
