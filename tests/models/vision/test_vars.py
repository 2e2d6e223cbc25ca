"""VARS attention (SPEC §3): the ISTA solver, the three dictionaries, and VARS inside (Ab)SViT."""

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from absvl import create_backbone
from absvl.models.vision import vars_attention as va
from absvl.models.vision.vars_attention import (
    VARSDAttention,
    VARSSAttention,
    VARSSDAttention,
    circular_spectrum,
    conv_analysis,
    conv_synthesis,
    ista,
    positive_random_features,
)

VARIANTS = [VARSDAttention, VARSSAttention, VARSSDAttention]
GRIDS = [(4, 4), (6, 8)]
DIM, HEADS = 32, 2


def _layer(cls, seed=0, **kw):
    torch.manual_seed(seed)
    if cls is VARSSDAttention:
        kw.setdefault("grid_size", 4)
    return cls(DIM, num_heads=HEADS, **kw)


def _tokens(grid, b=2, seed=0, prefix=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, prefix + grid[0] * grid[1], DIM, generator=g)


def _energy(P, x, u, lam):
    return 0.5 * np.sum((P @ u - x) ** 2) + lam * np.abs(u).sum()


def _lasso_coordinate_descent(P, x, lam, sweeps=20000):
    u = np.zeros(P.shape[1])
    col_sq = (P**2).sum(0)
    r = x.copy()
    for _ in range(sweeps):
        change = 0.0
        for j in range(P.shape[1]):
            r += P[:, j] * u[j]
            rho = P[:, j] @ r
            new = np.sign(rho) * max(abs(rho) - lam, 0.0) / col_sq[j]
            change = max(change, abs(new - u[j]))
            u[j] = new
            r -= P[:, j] * u[j]
        if change < 1e-13:
            break
    return u


# --- the solver -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bound", ["exact", "row_sum"])
def test_ista_steps_never_increase_the_energy(seed, bound):
    rng = np.random.default_rng(seed)
    P, x, lam = rng.standard_normal((12, 20)), rng.standard_normal(12), 0.2  # overcomplete dictionary
    gram = P.T @ P
    L = np.linalg.eigvalsh(gram).max() if bound == "exact" else np.abs(gram).sum(1).max() + 1
    rhs, G = torch.from_numpy(P.T @ x)[:, None], torch.from_numpy(gram)
    energies = [_energy(P, x, ista(rhs, G, lam, L, steps).numpy()[:, 0], lam) for steps in range(40)]
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:]))
    assert energies[-1] < energies[0]


def test_ista_converges_to_the_lasso_solution():
    rng = np.random.default_rng(0)
    P, x, lam = rng.standard_normal((30, 15)), rng.standard_normal(30), 0.5
    ref = _lasso_coordinate_descent(P, x, lam)
    assert 0 < np.count_nonzero(ref) < 15  # the sparsity is active
    gram, L = torch.from_numpy(P.T @ P), float(np.linalg.eigvalsh(P.T @ P).max())
    rhs = torch.from_numpy(P.T @ x)[:, None]
    np.testing.assert_allclose(ista(rhs, gram, lam, L, 3000).numpy()[:, 0], ref, atol=1e-8)
    np.testing.assert_allclose(ista(rhs, gram.matmul, lam, L, 3000).numpy()[:, 0], ref, atol=1e-8)  # callable Gram


# --- VARS-D -----------------------------------------------------------------------------
class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("cls", [VARSDAttention, VARSSDAttention])
def test_dictionary_cost_is_linear_in_tokens(cls):
    """The Gram is [B, heads, atoms, atoms] whatever N; no tensor, forward or backward, is N×N."""
    layer = _layer(cls)
    atoms = layer.num_features * (2 if cls is VARSSDAttention else 1)
    for grid in GRIDS:
        x = _tokens(grid).requires_grad_()
        n = x.shape[1]
        with _ShapeRecorder() as rec:
            layer(x, grid_size=grid).sum().backward()
        assert (2, HEADS, atoms, atoms) in rec.shapes
        assert (2, HEADS, n, atoms) in rec.shapes
        assert not [s for s in rec.shapes if s.count(n) > 1]


def test_self_attention_is_vars_d_with_one_step_and_no_sparsity():
    """λ = 0, no ISTA step: the output is ΦΦᵀv, the symmetric-kernel attention of Eq. 14."""
    layer = _layer(VARSDAttention, lam=0.0, steps=0)
    x = _tokens((4, 4))
    q, _, v = layer.qkv(x).view(2, 17, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    phi = torch.nn.functional.normalize(positive_random_features(q, layer.random_matrix), dim=-2)
    ref = layer.proj((phi @ phi.transpose(-2, -1) @ v).transpose(1, 2).reshape(2, 17, DIM))
    torch.testing.assert_close(layer(x), ref)


def test_random_features_are_positive_and_fixed():
    layer = _layer(VARSDAttention)
    assert layer.random_matrix.shape == (HEADS, DIM // HEADS, 2 * DIM // HEADS)
    assert "random_matrix" in layer.state_dict() and not layer.random_matrix.requires_grad
    before = layer.random_matrix.clone()
    layer(_tokens((4, 4))).sum().backward()
    assert torch.equal(before, layer.random_matrix)
    assert (positive_random_features(torch.randn(2, HEADS, 5, DIM // HEADS), layer.random_matrix) > 0).all()


@pytest.mark.parametrize("target", ["v", "qkv"])
def test_topdown_reaches_the_queries_only_with_qkv(target, monkeypatch):
    seen, features = [], va.positive_random_features
    monkeypatch.setattr(va, "positive_random_features", lambda q, w: seen.append(q) or features(q, w))
    layer = _layer(VARSDAttention, td_target=target)
    x, td = _tokens((4, 4)), _tokens((4, 4), seed=1)
    out0, out1 = layer(x), layer(x, td=td)
    assert not torch.allclose(out0, out1)
    q_td = (td @ layer.qkv.weight[:DIM].T).view(2, 17, HEADS, -1).transpose(1, 2)  # no bias: td_bias=False
    if target == "v":
        assert torch.equal(seen[0], seen[1])
    else:
        torch.testing.assert_close(seen[1] - seen[0], q_td)


def test_lista_variant():
    plain, lista = _layer(VARSDAttention), _layer(VARSDAttention, lista=True)
    assert lista.steps == 5 and plain.steps == 3
    lista.load_state_dict(plain.state_dict(), strict=False)
    x = _tokens((4, 4))
    assert not torch.allclose(plain(x), lista(x))  # GELU shrinkage and 5 steps
    lista(x).square().sum().backward()
    for name in ("lista_transform", "lista_threshold", "lista_step"):
        assert getattr(lista, name).grad.abs().sum() > 0, name
    sd = _layer(VARSSDAttention, lista=True)
    assert sd.lista_transform.shape == (2 * sd.num_features,) * 2
    sd(_tokens((6, 8)), grid_size=(6, 8)).sum().backward()


# --- VARS-S -----------------------------------------------------------------------------
@pytest.mark.parametrize("grid,k", [((6, 8), 3), ((4, 5), 7)])  # the second folds the kernel onto the torus
def test_static_dictionary_operators(grid, k):
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, k, k, dtype=torch.float64)
    spectrum = circular_spectrum(kernel.float(), grid)
    if k <= min(grid):  # rfft2 of the kernel rolled so its centre sits at the origin
        padded = torch.zeros(3, 2, *grid)
        padded[..., :k, :k] = kernel.float()
        ref = torch.fft.rfft2(padded.roll((-(k // 2), -(k // 2)), dims=(-2, -1)))
        torch.testing.assert_close(spectrum, ref, rtol=1e-5, atol=1e-5)
    x, u = torch.randn(4, 3, *grid), torch.randn(4, 3, 2, *grid)
    px, pu = conv_analysis(x, spectrum), conv_synthesis(u, spectrum)
    torch.testing.assert_close((px * u).sum(), (x * pu).sum(), rtol=1e-4, atol=1e-4)  # P and Pᵀ are adjoint
    # L = max_ω Σ|k̂|² is the exact top eigenvalue of PᵀP (dense matrix of channel 0)
    basis = torch.eye(2 * grid[0] * grid[1]).view(-1, 1, 2, *grid).expand(-1, 3, -1, -1, -1)
    P = conv_synthesis(basis, spectrum)[:, 0].reshape(basis.shape[0], -1).T
    L = spectrum.abs().square().sum(1).amax((-2, -1))
    torch.testing.assert_close(torch.linalg.eigvalsh(P.T @ P).max(), L[0], rtol=1e-4, atol=1e-4)


def test_static_dictionary_ista_energy_decreases():
    layer = _layer(VARSSAttention)
    grid = (6, 8)
    spectrum = circular_spectrum(layer.kernel.detach(), grid)
    L = spectrum.abs().square().sum(1).amax((-2, -1)).view(1, -1, 1, 1, 1)
    x = torch.randn(1, DIM, *grid)

    def energy(u):
        return 0.5 * (conv_synthesis(u, spectrum) - x).square().sum() + 0.3 * u.abs().sum()

    gram = lambda u: conv_analysis(conv_synthesis(u, spectrum), spectrum)  # noqa: E731
    energies = [energy(ista(conv_analysis(x, spectrum), gram, 0.3, L, s)).item() for s in range(8)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(energies, energies[1:])) and energies[-1] < energies[0]


def test_static_layer_prefix_tokens_average_the_reconstruction():
    layer = _layer(VARSSAttention, num_prefix_tokens=1)
    x = _tokens((4, 4))
    with torch.no_grad():
        out = layer(x) - layer.proj.bias
        x2 = x.clone()
        x2[:, 0] = 5.0  # the [cls] value enters nothing
        torch.testing.assert_close(layer(x2), layer(x))
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1), rtol=1e-4, atol=1e-5)


# --- all variants -----------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls", VARIANTS)
def test_forward_backward_any_grid(cls, grid):
    layer = _layer(cls)
    x = _tokens(grid).requires_grad_()
    out = layer(x, grid_size=grid)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", VARIANTS)
def test_topdown_and_value_mask(cls):
    layer = _layer(cls).eval()
    x, td = _tokens((4, 4)), _tokens((4, 4), seed=1)
    base = layer(x)
    assert not torch.allclose(layer(x, td=td), base)
    torch.testing.assert_close(layer(x, value_mask=torch.ones(2, 17, 1)), base)
    mask = torch.rand(2, 17, 1, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(layer(x, value_mask=mask), base)
    assert torch.allclose(layer(x, value_mask=torch.zeros(2, 17, 1)), layer.proj.bias.expand(2, 17, -1))


@pytest.mark.parametrize("cls", VARIANTS)
def test_state_dict_round_trip_is_exact(cls):
    layer, other = _layer(cls, seed=0), _layer(cls, seed=1)
    x = _tokens((6, 8))
    assert not torch.allclose(layer(x, grid_size=(6, 8)), other(x, grid_size=(6, 8)))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x, grid_size=(6, 8)), other(x, grid_size=(6, 8)))


@pytest.mark.parametrize("cls", VARIANTS)
def test_bf16_autocast_and_square_grid_inference(cls):
    layer = _layer(cls)
    x = _tokens((4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), layer(x), rtol=0.1, atol=0.05)
    if cls is not VARSDAttention:
        with pytest.raises(ValueError, match="grid"):
            layer(_tokens((6, 8)))


def test_bad_td_target():
    for cls in VARIANTS:
        with pytest.raises(ValueError, match="td_target"):
            _layer(cls, td_target="k")


# --- inside the ViT / AbSViT ------------------------------------------------------------
@pytest.mark.parametrize("attn", ["vars_d", "vars_s", "vars_sd"])
@pytest.mark.parametrize("topdown", ["vit", "absvit"])
def test_backbones_forward_backward(attn, topdown):
    torch.manual_seed(0)
    model = create_backbone(f"{attn}_{topdown}_test_patch8")
    for h, w in [(32, 32), (48, 64)]:
        out = model(torch.randn(2, 3, h, w))
        assert out.tokens.shape == (2, 1 + h * w // 64, 64) and out.grid_size == (h // 8, w // 8)
        loss = out.tokens.square().mean() + sum(out.aux_losses.values())
        model.zero_grad()
        loss.backward()
        assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0
        if topdown == "absvit":
            assert "var" in out.aux_losses and torch.isfinite(out.aux_losses["var"])
            assert (out.tokens - out.bottom_up_tokens).abs().max() > 1e-5


def test_vit_weights_load_into_vars_d():
    """timm-named ViT weights fill VARS-D completely but for the random features (kept as drawn)."""
    vit = create_backbone("vit_test_patch8")
    model = create_backbone("vars_d_vit_test_patch8")
    report = model.load_state_dict(vit.state_dict(), strict=False)
    assert report.unexpected_keys == []
    assert report.missing_keys == [f"blocks.{i}.attn.random_matrix" for i in range(4)]


def test_ista_iterating_l_times_u_equals_eq_12():
    """The iterate w = L·u (one softshrink per step) gives Eq. 12's u and its gradients, per-problem L included."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.rand(2, 3, 50, 24, generator=g)
    gram, rhs = atoms.transpose(-2, -1) @ atoms, torch.randn(2, 3, 24, 8, generator=g)
    L = gram.abs().sum(-1).amax(-1)[..., None, None] + 1

    def eq_12(rhs, gram, lam):
        shrink = lambda x, t: x.sign() * (x.abs() - t).clamp(min=0)  # noqa: E731
        u = shrink(rhs, lam)
        for _ in range(3):
            u = shrink(u - (gram @ u - rhs) / L, lam / L)
        return u

    for lam in (0.3, torch.tensor(0.3)):
        ours, ref = (rhs.clone().requires_grad_() for _ in range(2))
        out, expected = ista(ours, gram, lam, L, 3), eq_12(ref, gram, lam)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
