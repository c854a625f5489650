"""The decoder's Gaussian prior (`model.decoder_prior: gaussian`): a linear imputation the transformer corrects.

Each masked patch starts from the conditional expectation of a Gaussian model of the parcels at one timepoint,

    E[x_M(t) | x_V(t)] = mu_M + C_MV (C_VV + lam s I)^-1 (x_V(t) - mu_V),   s = trace(C) / R,

with C the training split's parcel covariance shrunk toward the window's own (its visible values, the masked ones
imputed: C_w = (1 - alpha) C + alpha cov(window), two passes): the ``adaptive`` baseline of `brainlm reconstruct`,
computed in torch for a whole batch. ``impute`` is the one implementation: the ``ridge`` and ``adaptive`` baselines
(brainlm/eval/baselines.py) call it too. The decoder then predicts the correction to it.
The baseline is the floor the model starts from, and what the model scores above it is the transformer's doing.

mu and C are buffers fitted on training windows (`fit`); on another atlas (other coordinates) the prior has no
population covariance and falls back to the window's own (C = I in the first pass).

Shapes: B windows, R parcels, T timepoints, N patches, P timepoints per patch; masks are True where masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

PASSES = 2  # re-estimations of the window's own covariance, as the adaptive baseline
FIT_WINDOWS = 512  # training windows the prior is fitted on (as `brainlm reconstruct`'s baselines)


def with_context(cov_RR: Tensor, context_cov_BRR: Tensor, context_n_B: Tensor, strength: float) -> Tensor:
    """Each window's population covariance moved toward its recording context's: (k C + n C_c) / (k + n), k the
    strength in timepoints, n the window's context timepoints (0: C itself)."""
    n = context_n_B.to(cov_RR.dtype)[:, None, None]
    return (strength * cov_RR + n * context_cov_BRR.to(cov_RR)) / (strength + n)


def context_stats(signal_RT: Tensor, start: int, window: int) -> tuple[Tensor, int]:
    """The covariance of a crop's timepoints outside the window [start, start + window) and their count."""
    rest_RX = torch.cat([signal_RT[:, :start], signal_RT[:, start + window :]], dim=1).double()
    n = rest_RX.shape[1]
    if n < 2:
        return torch.zeros(signal_RT.shape[0], signal_RT.shape[0], dtype=torch.float64), 0
    return torch.cov(rest_RX), n


def fit(windows_BRT: Tensor) -> tuple[Tensor, Tensor]:
    """Per-parcel means and the parcel covariance pooled over every timepoint of the windows: (mu_R, cov_RR)."""
    x = windows_BRT.double()
    flat_RX = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat_RX.mean(dim=1), torch.cov(flat_RX)


def _spatial(xc_BNRP: Tensor, vis_BNR: Tensor, cov_BRR: Tensor, ridge: float) -> Tensor:
    """C_MV (C_VV + ridge I)^-1 x_V for every patch of every window, batched; centred values in and out.

    Each token column solves the system of its visible parcels only: they are gathered to the front, V_max (the
    most visible in the batch) wide, the rest pointing at an appended zero parcel (identity rows, zero right-hand
    side: they change nothing). The columns of a window with the same visible parcels (every column under parcel
    masking) share one factorisation. z = (C_VV + ridge I)^-1 x_V is scattered back to all R rows (zero on the masked
    ones), and C z is the imputation on the masked rows. Solved by Cholesky (the system is symmetric positive
    definite): batched LU (`torch.linalg.solve`) returned garbage pivots under 2-thread MKL on a 300-parcel training
    batch ("Pivots given to lu_solve must all be greater or equal to 1") and hung on others."""
    B, N, R, P = xc_BNRP.shape
    v_max = int(vis_BNR.sum(-1).max())
    if v_max == 0:
        return torch.where(vis_BNR[..., None], xc_BNRP, torch.zeros_like(xc_BNRP))
    device = vis_BNR.device
    # One system per window and set of visible parcels; k columns each when every system serves as many.
    window_X1 = torch.arange(B, device=device).repeat_interleave(N)[:, None]  # X = B * N token columns
    keys = torch.cat([window_X1, vis_BNR.reshape(B * N, R).long()], dim=-1)
    systems, column_system_X, count_U = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    k = int(count_U[0])
    if not bool((count_U == k).all()):
        systems, column_system_X, k = keys, torch.arange(B * N, device=device), 1
    U = len(systems)
    by_system_X = torch.argsort(column_system_X, stable=True)  # columns grouped by system, k per system
    window_U, vis_UR = systems[:, 0], systems[:, 1:].bool()
    # Visible parcels first (in order), then index R: the appended zero row and column.
    order_UR = torch.argsort((~vis_UR).to(torch.int8), dim=-1, stable=True)
    valid_UV = torch.arange(v_max, device=device) < vis_UR.sum(-1, keepdim=True)
    order_UV = torch.where(valid_UV, order_UR[:, :v_max], R)
    padded_BRR = torch.nn.functional.pad(cov_BRR, (0, 1, 0, 1))
    rows_UVR = padded_BRR[window_U[:, None], order_UV]  # whole rows first: far faster than one 3-index gather
    A = torch.gather(rows_UVR, 2, order_UV[:, None, :].expand(-1, v_max, -1))
    A.diagonal(dim1=-2, dim2=-1).add_(1 + (ridge - 1) * valid_UV.to(A.dtype))  # float64, not where()'s float32
    xc_XRP = torch.nn.functional.pad(xc_BNRP.reshape(B * N, R, P), (0, 0, 0, 1))[by_system_X]
    order_XV = order_UV.repeat_interleave(k, dim=0)
    rhs_XVP = torch.gather(xc_XRP, 1, order_XV[..., None].expand(-1, -1, P))
    rhs_UVJ = rhs_XVP.reshape(U, k, v_max, P).transpose(1, 2).reshape(U, v_max, k * P)
    z_UVJ = torch.cholesky_solve(rhs_UVJ, torch.linalg.cholesky(A))
    z_XVP = z_UVJ.reshape(U, v_max, k, P).transpose(1, 2).reshape(B * N, v_max, P)
    z_XRP = torch.zeros_like(xc_XRP).scatter_(1, order_XV[..., None].expand(-1, -1, P), z_XVP)
    z_XRP = z_XRP[torch.argsort(by_system_X)][:, :R]  # back to column order, without the zero row
    z_BRJ = z_XRP.reshape(B, N, R, P).transpose(1, 2).reshape(B, R, N * P)  # J = N * P: one product per window
    imputed_BNRP = (cov_BRR @ z_BRJ).reshape(B, R, N, P).transpose(1, 2)
    return torch.where(vis_BNR[..., None], xc_BNRP, imputed_BNRP)


@torch.no_grad()
def impute(
    signal_BRT: Tensor,
    mask_BRN: Tensor,
    mu_R: Tensor | None,
    cov_RR: Tensor | None,
    patch_size: int,
    ridge: float,
    shrinkage: float,
    passes: int = PASSES,
    scale: float | None = None,
    start_BRT: Tensor | None = None,
) -> Tensor:
    """The prior for every value (the visible ones are the signal itself): prior_BRT, in the signal's dtype.

    ``mu_R`` / ``cov_RR`` None: no population model (another atlas), the window's own covariance only. ``cov_RR``
    may also be one covariance per window ([B, R, R]: e.g. the population's shrunk toward the recording's other
    windows). ``passes`` 0 with any shrinkage is the plain spatial imputation (the ``ridge`` baseline). The ridge
    is ``ridge x scale``, scale the mean variance of the population covariance unless given. ``start_BRT``: the
    spatial imputation under the same ridge, already computed (a settings search shares it across shrinkages)."""
    B, R, T = signal_BRT.shape
    N, P = T // patch_size, patch_size
    x = signal_BRT.double()
    if cov_RR is None:
        mu_R = torch.zeros(R, dtype=x.dtype, device=x.device)
        cov_RR = torch.eye(R, dtype=x.dtype, device=x.device)
    mu_R, cov_RR = mu_R.to(x), cov_RR.to(x)
    if scale is None:
        scale = float(torch.diagonal(cov_RR, dim1=-2, dim2=-1).mean())
    xc_BNRP = (x - mu_R[:, None]).reshape(B, R, N, P).transpose(1, 2)
    vis_BNR = ~mask_BRN.transpose(1, 2)
    population_BRR = cov_RR.expand(B, R, R)
    if start_BRT is None:
        pred_BNRP = _spatial(xc_BNRP, vis_BNR, population_BRR, ridge * scale)
    else:
        pred_BNRP = (start_BRT.to(x) - mu_R[:, None]).reshape(B, R, N, P).transpose(1, 2)
    for _ in range(passes):
        filled_BRT = pred_BNRP.transpose(1, 2).reshape(B, R, T)
        own_BRR = filled_BRT @ filled_BRT.transpose(1, 2) / T
        cov_BRR = (1 - shrinkage) * population_BRR + shrinkage * own_BRR
        pred_BNRP = _spatial(xc_BNRP, vis_BNR, cov_BRR, ridge * scale)
    return (pred_BNRP.transpose(1, 2).reshape(B, R, T) + mu_R[:, None]).to(signal_BRT.dtype)
