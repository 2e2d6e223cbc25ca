"""VARS attention: attention as recurrent sparse reconstruction (Shi et al., ICML 2022).

A layer returns Pũ*, ``ũ* = argmin ½‖Pũ − x‖² + λ‖ũ‖₁`` (Eq. 10) by a few ISTA steps (Eq. 12), with a
dynamic (VARS-D, Eq. 16-17), static (VARS-S) or joint (VARS-SD, Sec. 3.5) dictionary P; drop-in
replacements for the ViT's ``Attention``. Overview in docs/backbones.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .topdown import qkv_rows

_TD_TARGETS = ("v", "qkv")


def soft_threshold(x: torch.Tensor, theta: torch.Tensor | float, smooth: bool = False) -> torch.Tensor:
    """``S_θ(x) = sign(x)·max(|x| − θ, 0)``; ``smooth`` uses GELU for the max (authors' LISTA).

    The plain form is ``softshrink`` for a number θ (one fused kernel, forward and backward), else
    ``x − clamp(x, −θ, θ)``.
    """
    if smooth:
        return x.sign() * F.gelu(x.abs() - theta)
    if isinstance(theta, (int, float)):
        return F.softshrink(x, theta)
    return x - x.clamp(-theta, theta)


def ista(
    rhs: torch.Tensor,
    gram: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    lam: torch.Tensor | float,
    lipschitz: torch.Tensor | float,
    steps: int,
    smooth: bool = False,
) -> torch.Tensor:
    """ISTA for ``min_u ½‖Pu − x‖² + λ‖u‖₁`` given ``rhs = Pᵀx`` and ``gram = PᵀP``.

    ``gram`` is a matrix applied as ``gram @ u`` (batched ``[..., m, m]`` on ``[..., m, d]``: one
    problem per column of ``rhs``) or a callable ``u -> PᵀPu``. ``lipschitz`` must be ≥ the
    largest eigenvalue of PᵀP for the energy to decrease. As in the authors' code, the code
    starts at ``S_λ(Pᵀx)`` (the exact solution when the atoms are orthonormal); each step is
    ``u ← S_{λ/L}(u − (PᵀPu − Pᵀx)/L)`` (Eq. 12). The plain shrinkage is homogeneous,
    ``S_{λ/L}(y) = S_λ(L·y)/L``, so the iterate is ``w = L·u``: ``w ← S_λ((I − PᵀP/L)w + Pᵀx)``,
    thresholded at λ itself, a number for VARS-D/S (``softshrink``: 17 % off a VARS-D layer's
    train step at ViT-Ti size). The GELU shrinkage is not homogeneous: it iterates u.
    """
    if callable(gram):
        descend = lambda u: u - gram(u) / lipschitz  # noqa: E731
    else:  # fold the step into one matrix: u - (G u)/L = (I - G/L) u
        descend = (torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device) - gram / lipschitz).matmul
    offset, threshold, scale = (rhs / lipschitz, lam / lipschitz, 1.0) if smooth else (rhs, lam, lipschitz)
    w = scale * soft_threshold(rhs, lam, smooth)
    for _ in range(steps):
        w = soft_threshold(descend(w) + offset, threshold, smooth)
    return w / scale


def positive_random_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Performer's positive features of the L2-normalised x: ``exp(x̂W − ‖x̂‖²/2)/√m``.

    ``x`` is ``[B, heads, N, d]`` and ``projection`` (W) ``[heads, d, m]``; returns ``[B, heads, N, m]``.
    """
    x = F.normalize(x, dim=-1)
    return torch.exp(x @ projection - x.square().sum(-1, keepdim=True) / 2) / projection.shape[-1] ** 0.5


def circular_spectrum(kernel: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """``rfft2`` on the h×w torus of ``[..., k_h, k_w]`` kernels centred on the origin.

    Works for any grid: taps beyond the grid wrap around (the kernel is folded onto the torus).
    Returns ``[..., h, w // 2 + 1]`` complex.
    """

    def dft(n: int, taps: int, half: bool) -> torch.Tensor:
        freqs = torch.arange(n // 2 + 1 if half else n, device=kernel.device, dtype=torch.float32)
        offsets = torch.arange(taps, device=kernel.device, dtype=torch.float32) - taps // 2
        return torch.exp(-2j * math.pi / n * torch.outer(freqs, offsets))

    (h, w), (k_h, k_w) = grid_size, kernel.shape[-2:]
    return dft(h, k_h, False) @ kernel.to(torch.complex64) @ dft(w, k_w, True).T


def conv_analysis(x: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """``Pᵀx``: correlate each channel of ``x`` ``[B, C, h, w]`` with its atoms → ``[B, C, atoms, h, w]``."""
    return torch.fft.irfft2(spectrum.conj() * torch.fft.rfft2(x).unsqueeze(2), s=x.shape[-2:])


def conv_synthesis(u: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """``Pu``: the atoms convolved with their codes ``[B, C, atoms, h, w]``, summed → ``[B, C, h, w]``."""
    return torch.fft.irfft2((spectrum * torch.fft.rfft2(u)).sum(2), s=u.shape[-2:])


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (where the device has autocast at all) for the sparse coding."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _grid(num_tokens: int, num_prefix_tokens: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    """The token grid; a square one is inferred when ``grid_size`` is None."""
    n = num_tokens - num_prefix_tokens
    if grid_size is None:
        grid_size = (math.isqrt(n),) * 2
    if grid_size[0] * grid_size[1] != n:
        raise ValueError(f"{n} spatial tokens do not form the grid {tuple(grid_size)}; pass grid_size=(h, w)")
    return tuple(grid_size)


def _check_td_target(td_target: str) -> None:
    if td_target not in _TD_TARGETS:
        raise ValueError(f"td_target={td_target!r} must be one of {_TD_TARGETS}")


class VARSDAttention(nn.Module):
    """VARS-D (Eq. 16–17): per head and channel μ of v, ``argmin_u ½‖Du − v^μ‖² + λ‖u‖₁``, output Du.

    D = φ(q) are positive random features of the L2-normalised queries (W ~ N(0, 1) of shape
    ``[heads, head_dim, feature_ratio·head_dim]``, a persistent buffer), columns L2-normalised
    over tokens. λ is the authors' code's (Eq. 16 writes 2λ); λ = 0.3 and 3 steps are the
    paper's defaults. Self-attention is this with one Euler step and no sparsity (Eq. 14–15).
    ``lista=True``: the authors' later variant (learned Gram transform, step and threshold
    scales, GELU inside the shrinkage, 5 steps).

    Per head, one LASSO per channel of v is solved with the m×m Gram DᵀD, so the cost is
    linear in the number of tokens.

    Parameter names follow timm (``qkv``, ``proj``) so timm/DeiT weights load; the authors use
    a ``[q, v]`` projection of width 2·dim, here the key slice of ``qkv`` is simply unused
    (k = q, the symmetric kernel of Eq. 14). ``attn_drop`` is accepted for the drop-in
    interface; there is no attention matrix to drop.
    ``num_static_atoms`` is set by VARS-SD (extra atoms of the LISTA Gram transform).
    """

    token_grid = True  # the prefix tokens are kept out of the spatial dictionary (VARS-SD) / the filter (VARS-S)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        td_target: str = "v",
        td_bias: bool = False,
        num_prefix_tokens: int = 1,
        lam: float = 0.3,
        steps: int | None = None,
        feature_ratio: int = 2,
        lista: bool = False,
        num_static_atoms: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        _check_td_target(td_target)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.td_target = td_target
        self.td_bias = td_bias
        self.num_prefix_tokens = num_prefix_tokens
        self.lam = lam
        self.lista = lista
        self.steps = (5 if lista else 3) if steps is None else steps
        self.num_features = feature_ratio * self.head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # W of the random features: drawn once, saved with the model, never redrawn.
        self.register_buffer("random_matrix", torch.randn(num_heads, self.head_dim, self.num_features))
        if lista:  # the authors' later "LISTA" variant: learned Gram transform, step and threshold scales
            self.lista_transform = nn.Parameter(torch.eye(self.num_features + num_static_atoms))
            self.lista_threshold = nn.Parameter(torch.ones(()))
            self.lista_step = nn.Parameter(torch.ones(()))

    def dictionary(self, q: torch.Tensor, grid_size: tuple[int, int] | None) -> torch.Tensor:
        """Unnormalised atoms ``[B, heads, N, atoms]`` from the float32 queries ``[B, heads, N, d]``."""
        return positive_random_features(q, self.random_matrix.float())

    def sparse_code(self, rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """ISTA on ``[B, heads, atoms, d]`` with L = max row-sum of |DᵀD| + 1 (≥ its top eigenvalue)."""
        lipschitz = gram.abs().sum(-1).amax(-1)[..., None, None].detach() + 1
        if not self.lista:
            return ista(rhs, gram, self.lam, lipschitz, self.steps)
        t = self.lista_transform
        # The authors multiply T·G·T; Tᵀ·G·T is the same at init and stays symmetric PSD.
        return ista(rhs, t.T @ gram @ t, self.lam * self.lista_threshold, lipschitz / self.lista_step, self.steps, True)

    def forward(
        self,
        x: torch.Tensor,
        td: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        q = qkv_rows(self.qkv, x, 0, 1, td if self.td_target == "qkv" else None, self.td_bias)
        v = qkv_rows(self.qkv, x, 2, 3, td, self.td_bias)
        if value_mask is not None:
            v = v * value_mask
        q, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, v))
        with _full_precision(x.device):
            atoms = F.normalize(self.dictionary(q.float(), grid_size), dim=-2)  # unit norm over tokens
            atoms_t = atoms.transpose(-2, -1)
            code = self.sparse_code(atoms_t @ v.float(), atoms_t @ atoms)
            out = (atoms @ code).to(v.dtype)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class VARSSDAttention(VARSDAttention):
    """VARS-SD (Sec. 3.5): the dictionary ``[φ(q), S]``, dynamic atoms plus static ones, solved jointly.

    As in the authors' code the static atoms S are a learned token×atom matrix per head
    (``static_atoms`` of them, default as many as the random features) at a fixed
    ``grid_size``; other grids get it bicubically resampled (as timm does for position
    embeddings). Prefix tokens have no position: S is zero there, so they are reconstructed
    from the dynamic atoms only. Columns are normalised after the union, L and ISTA as in VARS-D.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        static_atoms: int | None = None,
        grid_size: int | tuple[int, int] = 14,
        feature_ratio: int = 2,
        **kwargs: Any,
    ) -> None:
        num_static = static_atoms if static_atoms is not None else feature_ratio * (dim // num_heads)
        super().__init__(dim, num_heads, feature_ratio=feature_ratio, num_static_atoms=num_static, **kwargs)
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.static_atoms = nn.Parameter(torch.randn(num_heads, num_static, h, w))

    def dictionary(self, q: torch.Tensor, grid_size: tuple[int, int] | None) -> torch.Tensor:
        B, _, N, _ = q.shape
        grid = _grid(N, self.num_prefix_tokens, grid_size)
        static = self.static_atoms.float()
        if grid != tuple(static.shape[-2:]):
            static = F.interpolate(static, size=grid, mode="bicubic", align_corners=False, antialias=True)
        static = F.pad(static.flatten(2).transpose(1, 2), (0, 0, self.num_prefix_tokens, 0))  # [heads, N, atoms]
        return torch.cat([super().dictionary(q, grid), static.expand(B, -1, -1, -1)], dim=-1)


class VARSSAttention(nn.Module):
    """VARS-S (Eq. 10–12): a static, translation-invariant dictionary on the token grid.

    Each channel of v has ``atoms_per_channel`` learned k×k kernels; Pᵀ correlates the channel
    with them (a depthwise convolution) and P is the transposed convolution with the same
    weights. As in the authors' Fourier-domain code the convolutions are circular (computed
    with FFTs, kernels folded onto the torus, so any grid size works), which makes PᵀP
    diagonal per frequency: L = max_ω Σ_atoms |k̂(ω)|² per channel, its exact top eigenvalue.
    Atoms start at unit norm; ISTA as in ``ista``. The authors use full-grid kernels at a
    fixed resolution, λ = 3.5 and 3 steps on un-normalised inputs; behind this block's
    LayerNorm and timm's init every code |Pᵀv| is far below 3.5 (the layer would output 0 and
    get no gradient), hence λ = 0.3 by default.

    Prefix tokens have no position and no atom: their output is the mean of the reconstructed
    spatial tokens, so a [cls] token still gathers the attended image content. The layer has
    no queries or keys: it projects only v (``v``, the value rows of a timm ``qkv``), ``td``
    is added to v for either ``td_target``, and ``num_heads``/``attn_drop`` are accepted for
    the drop-in interface only.
    """

    token_grid = True  # the filter runs on the grid of the spatial tokens

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        td_target: str = "v",
        td_bias: bool = False,
        num_prefix_tokens: int = 1,
        lam: float = 0.3,
        steps: int = 3,
        atoms_per_channel: int = 5,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        _check_td_target(td_target)
        self.td_target = td_target
        self.td_bias = td_bias
        self.num_prefix_tokens = num_prefix_tokens
        self.lam = lam
        self.steps = steps
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        kernel = torch.randn(dim, atoms_per_channel, kernel_size, kernel_size)
        self.kernel = nn.Parameter(kernel / kernel.flatten(2).norm(dim=-1)[..., None, None])

    def forward(
        self,
        x: torch.Tensor,
        td: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        h, w = _grid(N, self.num_prefix_tokens, grid_size)
        v = qkv_rows(self.v, x, 0, 1, td, self.td_bias)
        if value_mask is not None:
            v = v * value_mask
        with _full_precision(x.device):
            spectrum = circular_spectrum(self.kernel.float(), (h, w))  # [C, atoms, h, w//2+1]
            lipschitz = spectrum.abs().square().sum(1).amax((-2, -1)).detach().clamp_min(1e-6)
            signal = v[:, self.num_prefix_tokens :].float().transpose(1, 2).reshape(B, C, h, w)
            code = ista(
                conv_analysis(signal, spectrum),
                lambda u: conv_analysis(conv_synthesis(u, spectrum), spectrum),
                self.lam,
                lipschitz.view(1, C, 1, 1, 1),
                self.steps,
            )
            spatial = conv_synthesis(code, spectrum).flatten(2).transpose(1, 2).to(v.dtype)
        prefix = spatial.mean(1, keepdim=True).expand(B, self.num_prefix_tokens, C)
        return self.proj_drop(self.proj(torch.cat([prefix, spatial], dim=1)))
