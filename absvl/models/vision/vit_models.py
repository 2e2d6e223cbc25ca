"""The registered ViT family: ViT, AbSViT and VARS models, one function each with its default config
(family; the timm ImageNet weights of the matching plain architecture that ``pretrained=True`` loads)."""

from __future__ import annotations

from typing import Any

from .registry import register_backbone
from .vision_transformer import VisionTransformer

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    # test-sized: 4 blocks of width 64, 2 heads
    "test": dict(embed_dim=64, depth=4, num_heads=2),
}


def _vit(size: str, fixed: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    """The ``size`` model (224 px, test size 32 px) with the model's ``fixed`` arguments; ``overrides`` win."""
    return VisionTransformer(**{**_SIZES[size], "img_size": 32 if size == "test" else 224, **fixed, **overrides})


@register_backbone("vit", pretrained="deit_tiny_patch16_224.fb_in1k")
def vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 (DeiT's architecture)."""
    return _vit("tiny", dict(patch_size=16, topdown="none"), kwargs)


@register_backbone("absvit", pretrained="deit_tiny_patch16_224.fb_in1k")
def absvit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """AbSViT-Ti/16."""
    return _vit("tiny", dict(patch_size=16, topdown="absvit"), kwargs)


@register_backbone("vars", pretrained="deit_tiny_patch16_224.fb_in1k")
def vars_d_vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 with VARS-D attention."""
    return _vit("tiny", dict(patch_size=16, topdown="none", attention="vars_d"), kwargs)


@register_backbone("vit", pretrained="deit_small_patch16_224.fb_in1k")
def vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16 (DeiT's architecture)."""
    return _vit("small", dict(patch_size=16, topdown="none"), kwargs)


@register_backbone("absvit", pretrained="deit_small_patch16_224.fb_in1k")
def absvit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """AbSViT-S/16."""
    return _vit("small", dict(patch_size=16, topdown="absvit"), kwargs)


@register_backbone("vars", pretrained="deit_small_patch16_224.fb_in1k")
def vars_d_vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16 with VARS-D attention."""
    return _vit("small", dict(patch_size=16, topdown="none", attention="vars_d"), kwargs)


@register_backbone("vit", pretrained="deit_base_patch16_224.fb_in1k")
def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (DeiT's architecture)."""
    return _vit("base", dict(patch_size=16, topdown="none"), kwargs)


@register_backbone("absvit", pretrained="deit_base_patch16_224.fb_in1k")
def absvit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """AbSViT-B/16."""
    return _vit("base", dict(patch_size=16, topdown="absvit"), kwargs)


@register_backbone("vars", pretrained="deit_base_patch16_224.fb_in1k")
def vars_d_vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16 with VARS-D attention."""
    return _vit("base", dict(patch_size=16, topdown="none", attention="vars_d"), kwargs)


@register_backbone("vit", pretrained="deit_tiny_patch16_224.fb_in1k")
def vit_tiny_patch8_224_gap(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/8, average-pooled (its DeiT patch embedding is resampled 16 → 8)."""
    return _vit("tiny", dict(patch_size=8, topdown="none", global_pool="avg"), kwargs)


@register_backbone("absvit", pretrained="deit_tiny_patch16_224.fb_in1k")
def absvit_tiny_patch8_224_gap(**kwargs: Any) -> VisionTransformer:
    """AbSViT-Ti/8, average-pooled as the authors' ``*_gap`` models."""
    return _vit("tiny", dict(patch_size=8, topdown="absvit", global_pool="avg"), kwargs)


@register_backbone("vit", test_size=True)
def vit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized ViT: 4 blocks of width 64, 2 heads, 32 px."""
    return _vit("test", dict(patch_size=8, topdown="none"), kwargs)


@register_backbone("absvit", test_size=True)
def absvit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized AbSViT."""
    return _vit("test", dict(patch_size=8, topdown="absvit"), kwargs)


@register_backbone("vars", test_size=True)
def vars_d_vit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized ViT with VARS-D attention."""
    return _vit("test", dict(patch_size=8, topdown="none", attention="vars_d"), kwargs)


@register_backbone("vars", test_size=True)
def vars_d_absvit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized AbSViT with VARS-D attention."""
    return _vit("test", dict(patch_size=8, topdown="absvit", attention="vars_d"), kwargs)


@register_backbone("vars", test_size=True)
def vars_s_vit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized ViT with VARS-S attention."""
    return _vit("test", dict(patch_size=8, topdown="none", attention="vars_s"), kwargs)


@register_backbone("vars", test_size=True)
def vars_s_absvit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized AbSViT with VARS-S attention."""
    return _vit("test", dict(patch_size=8, topdown="absvit", attention="vars_s"), kwargs)


@register_backbone("vars", test_size=True)
def vars_sd_vit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized ViT with VARS-SD attention."""
    return _vit("test", dict(patch_size=8, topdown="none", attention="vars_sd"), kwargs)


@register_backbone("vars", test_size=True)
def vars_sd_absvit_test_patch8(**kwargs: Any) -> VisionTransformer:
    """Test-sized AbSViT with VARS-SD attention."""
    return _vit("test", dict(patch_size=8, topdown="absvit", attention="vars_sd"), kwargs)


@register_backbone("vars")
def vars_sd_vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 with VARS-SD attention."""
    return _vit("tiny", dict(patch_size=16, topdown="none", attention="vars_sd"), kwargs)


@register_backbone("vars", pretrained="deit_tiny_patch16_224.fb_in1k")
def vars_d_absvit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """AbSViT-Ti/16 with VARS-D attention."""
    return _vit("tiny", dict(patch_size=16, topdown="absvit", attention="vars_d"), kwargs)
