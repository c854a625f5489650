"""Generic transformer pieces: the attention function and its backends, blocks, position encodings.

Shapes: B batch, L query tokens, S key tokens, D width, H heads, d = D / H, F Fourier frequencies.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from brainlm.exceptions import ConfigError

_xformers_ops: ModuleType | None = None


def _xformers(q: Tensor) -> ModuleType:
    """xformers.ops, or a ConfigError saying why it cannot run here and what to use instead."""
    global _xformers_ops
    if _xformers_ops is None:
        try:
            _xformers_ops = importlib.import_module("xformers.ops")
        except ImportError as e:
            raise ConfigError(
                "`model.attention_backend` 'xformers' needs the xformers package, which is not installed "
                f"({e}). Install it on a CUDA machine (`pip install 'brainlm[gpu]'`) or use "
                "`model.attention_backend=sdpa` (fused kernels on CPU and GPU)."
            ) from e
    if not q.is_cuda:
        raise ConfigError(
            f"`model.attention_backend` 'xformers' runs on CUDA tensors only; got tensors on {q.device}. "
            "Use `model.attention_backend=sdpa` (the fused CPU kernel) or `math` off the GPU."
        )
    return _xformers_ops


def attention(
    q_BHLd: Tensor,
    k_BHSd: Tensor,
    v_BHSd: Tensor,
    backend: str = "sdpa",
    need_weights: bool = False,
    dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v -> out_BHLd; with `need_weights` (math only) also weights_BHLS.

    sdpa: torch's scaled_dot_product_attention (flash / memory-efficient / cuDNN on GPU, the fused
    flash kernel on CPU; memory linear in L). xformers: memory_efficient_attention, CUDA only. math:
    the explicit L x S weight matrix, for analysis and as the reference the others are tested against.
    """
    if need_weights and backend != "math":
        raise ValueError(f"attention weights need backend='math'; got backend={backend!r}")
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, dropout_p=dropout_p)
    if backend == "xformers":
        xops = _xformers(q_BHLd)
        # xformers wants [B, L, H, d]; the transposes are views (last dim stays contiguous).
        out_BLHd = xops.memory_efficient_attention(
            q_BHLd.transpose(1, 2), k_BHSd.transpose(1, 2), v_BHSd.transpose(1, 2), p=dropout_p
        )
        return out_BLHd.transpose(1, 2)
    if backend == "math":
        scores_BHLS = (q_BHLd * q_BHLd.shape[-1] ** -0.5) @ k_BHSd.transpose(-2, -1)
        # Softmax in fp32 so that bf16 runs agree with the fused kernels, which accumulate in fp32.
        weights_BHLS = torch.softmax(scores_BHLS, dim=-1, dtype=torch.float32).to(q_BHLd.dtype)
        out_BHLd = F.dropout(weights_BHLS, dropout_p) @ v_BHSd if dropout_p else weights_BHLS @ v_BHSd
        return (out_BHLd, weights_BHLS) if need_weights else out_BHLd
    raise ConfigError(f"`model.attention_backend` must be one of sdpa, xformers, math; got {backend!r}")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; optionally a depthwise convolution of the values over
    the token axis added to the output (the released BrainLM's Nystromformer layer: one kernel per head)."""

    def __init__(
        self, dim: int, num_heads: int, backend: str = "sdpa", dropout: float = 0.0, value_conv_kernel: int = 0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout) if dropout else nn.Identity()
        k = value_conv_kernel
        # [B, H, L, d] as an image with H channels: a (k, 1) kernel runs along the tokens, each head its own.
        self.value_conv = (
            nn.Conv2d(num_heads, num_heads, (k, 1), padding=(k // 2, 0), groups=num_heads, bias=False) if k else None
        )

    def forward(self, x_BLD: Tensor, return_cls_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attention output; with `return_cls_attention` also token 0's weights over all keys, w_BHL."""
        B, L, D = x_BLD.shape
        H = self.num_heads
        # unbind(2) then transpose (views): the backward stacks the q, k, v gradients straight into the
        # [B, L, 3, H, d] layout of the qkv output, one copy instead of a stack plus a permuting copy.
        q_BHLd, k_BHLd, v_BHLd = (t.transpose(1, 2) for t in self.qkv(x_BLD).view(B, L, 3, H, D // H).unbind(2))
        out_BHLd = attention(q_BHLd, k_BHLd, v_BHLd, self.backend)
        if self.value_conv is not None:
            out_BHLd = out_BHLd + self.value_conv(v_BHLd)
        # SDPA's CPU and GPU kernels return a [B, L, H, d] buffer viewed as [B, H, L, d]: this reshape is
        # then a free view rather than a copy.
        out_BLD = self.proj_drop(self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D)))
        if not return_cls_attention:
            return out_BLD
        # Only the CLS query against all keys: [B, H, 1, L], never the L x L matrix.
        scores_BH1L = (q_BHLd[:, :, :1] * q_BHLd.shape[-1] ** -0.5) @ k_BHLd.transpose(-2, -1)
        return out_BLD, torch.softmax(scores_BH1L, dim=-1, dtype=torch.float32).squeeze(2)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with dropout after each."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Transformer block, pre-LayerNorm (ViT, MAE) or post-LayerNorm (BERT, the released BrainLM: the norm after
    each residual sum); optionally recomputes its activations in the backward pass."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        backend: str = "sdpa",
        dropout: float = 0.0,
        eps: float = 1e-6,
        activation_checkpointing: bool = False,
        norm: str = "pre",
        value_conv_kernel: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, backend, dropout, value_conv_kernel)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.activation_checkpointing = activation_checkpointing
        self.post_norm = norm == "post"

    def _forward(self, x_BLD: Tensor, return_cls_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        attn_in = x_BLD if self.post_norm else self.norm1(x_BLD)
        attn = self.attn(attn_in, return_cls_attention=return_cls_attention)
        attn_BLD, weights = attn if return_cls_attention else (attn, None)
        if self.post_norm:
            x_BLD = self.norm1(x_BLD + attn_BLD)
            x_BLD = self.norm2(x_BLD + self.mlp(x_BLD))
        else:
            x_BLD = x_BLD + attn_BLD
            x_BLD = x_BLD + self.mlp(self.norm2(x_BLD))
        return (x_BLD, weights) if return_cls_attention else x_BLD

    def forward(self, x_BLD: Tensor, return_cls_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The block's output; with `return_cls_attention` also token 0's attention weights, w_BHL."""
        if return_cls_attention:
            return self._forward(x_BLD, return_cls_attention=True)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and keeps the dropout RNG state.
            return checkpoint(self._forward, x_BLD, use_reentrant=False)
        return self._forward(x_BLD)


class FactorizedBlock(nn.Module):
    """Divided space-time attention over the full token grid (TimeSformer's): attention along time within each
    parcel, then across parcels within each patch index, then the MLP; pre-LayerNorm. Token 0 (CLS) takes part in
    neither attention, only in the MLP.

    Why: the second attention compares parcels by what the first gathered along time, so a masked patch can be filled
    from the parcels that co-fluctuate with its parcel in this very window: the recording's own connectivity, which
    a fixed linear imputation (one covariance for every subject) cannot adapt to."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        backend: str = "sdpa",
        dropout: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm_t = nn.LayerNorm(dim, eps=eps)
        self.attn_t = Attention(dim, num_heads, backend, dropout)
        self.norm_s = nn.LayerNorm(dim, eps=eps)
        self.attn_s = Attention(dim, num_heads, backend, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.activation_checkpointing = False

    def forward(self, x_B1LD: Tensor, num_parcels: int) -> Tensor:
        """CLS + R x N parcel-major tokens in, the same out (recomputed in the backward pass under
        `train.activation_checkpointing`, as `Block`)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x_B1LD, num_parcels, use_reentrant=False)
        return self._forward(x_B1LD, num_parcels)

    def _forward(self, x_B1LD: Tensor, num_parcels: int) -> Tensor:
        B, S, D = x_B1LD.shape
        R = num_parcels
        cls_B1D, x_BRND = x_B1LD[:, :1], x_B1LD[:, 1:].reshape(B, R, (S - 1) // R, D)
        N = x_BRND.shape[2]
        t_XND = x_BRND.reshape(B * R, N, D)
        x_BRND = (t_XND + self.attn_t(self.norm_t(t_XND))).reshape(B, R, N, D)
        s_XRD = x_BRND.transpose(1, 2).reshape(B * N, R, D)
        x_BNRD = (s_XRD + self.attn_s(self.norm_s(s_XRD))).reshape(B, N, R, D)
        x_B1LD = torch.cat([cls_B1D, x_BNRD.transpose(1, 2).reshape(B, R * N, D)], dim=1)
        return x_B1LD + self.mlp(self.norm2(x_B1LD))


def sincos_1d(positions_N: Tensor, dim: int, max_period: float = 10000.0, layout: str = "halves") -> Tensor:
    """Fixed sinusoidal encoding [N, dim] of (possibly fractional) positions. ``halves``: [sin | cos] (MAE);
    ``interleaved``: sin in even, cos in odd columns (the PyTorch tutorial's, as the released BrainLM has it)."""
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=positions_N.device) / max(half, 1)
    omega = 1.0 / max_period**omega
    angles_NF = positions_N.to(torch.float64)[:, None] * omega[None, :]
    sin_NF, cos_NF = torch.sin(angles_NF), torch.cos(angles_NF)
    if layout == "interleaved":
        enc_ND = torch.stack([sin_NF, cos_NF], dim=-1).flatten(1).float()
    else:
        enc_ND = torch.cat([sin_NF, cos_NF], dim=1).float()
    if dim % 2:
        enc_ND = F.pad(enc_ND, (0, 1))
    return enc_ND


class FourierCoordEncoder(nn.Module):
    """Random Fourier features of 3-D coordinates followed by an MLP to `out_dim`.

    Expects coordinates normalised to roughly [-1, 1]. The frequencies are a fixed, seeded buffer
    (saved with the weights), drawn N(0, sigma^2) cycles per unit: with sigma 3 the typical wavelengths
    (tens of mm for coordinates divided by 100 mm) resolve neighbouring parcels, which sit ~10 mm apart.
    """

    def __init__(self, out_dim: int, num_frequencies: int = 64, sigma: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Drawn on the CPU explicitly, so that building the model on the meta device still works.
        freqs_F3 = torch.randn(num_frequencies, 3, generator=generator, device="cpu") * sigma
        self.register_buffer("freqs_F3", freqs_F3)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, coords_R3: Tensor) -> Tensor:
        angles_RF = (2 * math.pi) * (coords_R3 @ self.freqs_F3.to(coords_R3.dtype).T)
        return self.mlp(torch.cat([torch.sin(angles_RF), torch.cos(angles_RF)], dim=-1))
