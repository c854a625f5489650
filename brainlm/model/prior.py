"""The decoder's Gaussian prior (`model.decoder_prior: gaussian`): a linear imputation the transformer corrects.

Each masked patch starts from the conditional expectation of a Gaussian model of the parcels at one timepoint,

    E[x_M(t) | x_V(t)] = mu_M + C_MV (C_VV + lam s I)^-1 (x_V(t) - mu_V),   s = trace(C) / R,

with C the training split's parcel covariance shrunk toward the window's own (its visible values, the masked ones
imputed: C_w = (1 - alpha) C + alpha cov(window), two passes): the ``adaptive`` baseline of `brainlm reconstruct`,
computed in torch for a whole batch. ``impute`` is the one implementation: the ``ridge`` and ``adaptive`` baselines
(brainlm/eval/baselines.py) call it too. The decoder then predicts the correction to it.
The baseline is the floor the model starts from, and what the model scores above it is the transformer's doing.

mu and C are buffers fitted on training windows (`PriorMethods.fit_prior`), one slot per atlas: a model pretrained on
a mixture of shard sets keeps a prior for each atlas it saw (slot 0 the primary set's, `prior_mu_R`; slot k
`prior{k}_mu_R`, ...), and each window uses the slot fitted on its atlas (matched by coordinates). On another atlas the
prior has no population covariance and falls back to the window's own (C = I in the first pass) until it is refitted.

Shapes: B windows, R parcels, T timepoints, N patches, P timepoints per patch; masks are True where masked.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from brainlm.exceptions import DimensionError, InputError

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
    shared = cov_BRR.stride(0) == 0  # one covariance for every window (expanded): padded once
    padded_BRR = torch.nn.functional.pad(cov_BRR[:1] if shared else cov_BRR, (0, 1, 0, 1))
    source_U = torch.zeros_like(window_U) if shared else window_U
    # A = C_VV of each system, taken from the flat padded covariances by one index (a row gather and a column gather
    # after it cost twice as much)
    R1 = R + 1
    A = padded_BRR.reshape(-1)[(source_U[:, None, None] * R1 + order_UV[:, :, None]) * R1 + order_UV[:, None, :]]
    A.diagonal(dim1=-2, dim2=-1).add_(1 + (ridge - 1) * valid_UV.to(A.dtype))  # float64, not where()'s float32
    xc_XRP = torch.nn.functional.pad(xc_BNRP.reshape(B * N, R, P), (0, 0, 0, 1))[by_system_X]
    order_XV = order_UV.repeat_interleave(k, dim=0)
    rhs_XVP = torch.gather(xc_XRP, 1, order_XV[..., None].expand(-1, -1, P))
    rhs_UVJ = rhs_XVP.reshape(U, k, v_max, P).transpose(1, 2).reshape(U, v_max, k * P)
    L_UVV = torch.linalg.cholesky(A)  # then two triangular solves: a third of cholesky_solve's time on CPU
    y_UVJ = torch.linalg.solve_triangular(L_UVV, rhs_UVJ, upper=False)
    z_UVJ = torch.linalg.solve_triangular(L_UVV.mT, y_UVJ, upper=True)
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


PRIOR_KEY = re.compile(r"^prior(\d*)_(mu_R|cov_RR|coords_R3)$")  # a prior slot's buffer (slot 0 has no number)


def slot_names(slot: int) -> tuple[str, str, str]:
    """The buffers of prior slot ``slot``: (mu_R, cov_RR, coords_R3)."""
    tag = "prior" if slot == 0 else f"prior{slot}"
    return f"{tag}_mu_R", f"{tag}_cov_RR", f"{tag}_coords_R3"


def same_atlas(a_R3: Tensor, b_R3: Tensor) -> bool:
    """Whether two parcel-coordinate tables name the same atlas (same parcels, centres within 1e-3 mm)."""
    return a_R3.shape == b_R3.shape and torch.allclose(a_R3.to(b_R3), b_R3, atol=1e-3)


def is_prior_key(name: str) -> bool:
    """Whether a state-dict key is a prior statistic (fitted per atlas, never a trained weight)."""
    return PRIOR_KEY.match(name.rsplit(".", 1)[-1]) is not None


class PriorMethods:
    """The Gaussian prior's side of `BrainLM` (mixed in): its per-atlas statistics, fitting and use."""

    PRIOR_BUFFERS = slot_names(0)  # the primary atlas's slot

    def add_prior_slot(self, num_parcels: int) -> int:
        """Register an empty prior slot for an atlas of ``num_parcels`` parcels; returns its index."""
        slot = self.num_prior_slots
        for name, shape in zip(slot_names(slot), ((num_parcels,), (num_parcels,) * 2, (num_parcels, 3)), strict=True):
            self.register_buffer(name, torch.zeros(shape, device=self.patch_embed.weight.device))
        return slot

    @property
    def num_prior_slots(self) -> int:
        return sum(1 for name in self._buffers if PRIOR_KEY.match(name) and name.endswith("_cov_RR"))

    @torch.no_grad()
    def fit_prior(self, windows_BRT: Tensor, coords_R3: Tensor, slot: int = 0) -> None:
        """Fit the Gaussian prior's means and covariance on training windows of the atlas at `coords_R3`, into
        ``slot`` (0, the primary atlas's, by default; ``num_prior_slots`` adds one: pretraining on a mixture fits one
        per atlas). Any atlas: the model places parcels by their coordinates, so refitting on another atlas's training
        windows is how a pretrained model is used there (`brainlm.eval.common.load_context` does it on transfer)."""
        if self.decoder_prior_embed is None:
            raise InputError("this model has no prior to fit (`model.decoder_prior` is none)")
        R = windows_BRT.shape[1] if windows_BRT.ndim == 3 else -1
        if R < 2 or tuple(coords_R3.shape) != (R, 3):
            raise DimensionError(
                "the prior is fitted on windows [batch, parcels, timepoints] and their atlas's coordinates "
                f"[parcels, 3]; got windows {tuple(windows_BRT.shape)} and coordinates {tuple(coords_R3.shape)}"
            )
        if self.parcel_embed is not None and self.config.num_parcels != R:
            raise DimensionError(
                f"the windows have {R} parcels but the learned parcel table (`model.learned_parcel_embedding`) has "
                f"`model.num_parcels` = {self.config.num_parcels}"
            )
        if not 0 <= slot <= self.num_prior_slots:
            raise InputError(f"prior slot {slot} does not exist; slots 0..{self.num_prior_slots} can be fitted")
        if slot == self.num_prior_slots:
            self.add_prior_slot(R)
        for name, value in zip(slot_names(slot), (*fit(windows_BRT), coords_R3), strict=True):
            old = self._buffers[name]
            self._buffers[name] = value.to(device=old.device, dtype=old.dtype).clone()

    def prior_state(self) -> dict[str, Tensor]:
        """Every prior slot's statistics (copies): what the export writes in fp32."""
        return {name: buf.detach().clone() for name, buf in self._buffers.items() if PRIOR_KEY.match(name)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Saved slots may be for other atlases (their own sizes) and more than this model has: take the saved shapes.
        if self.decoder_prior_embed is not None:
            for key, saved in state_dict.items():
                name = key[len(prefix) :] if key.startswith(prefix) else None
                if name is None or not PRIOR_KEY.match(name):
                    continue
                old = self._buffers.get(name)
                if old is None or old.shape != saved.shape:
                    device = self.patch_embed.weight.device if old is None else old.device
                    dtype = torch.float32 if old is None else old.dtype
                    self._buffers[name] = torch.zeros(saved.shape, device=device, dtype=dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prior_slot(self, coords_R3: Tensor) -> int | None:
        """The index of the slot fitted on the atlas at `coords_R3`, or None when no slot was."""
        if self.decoder_prior_embed is None:
            return None
        for slot in range(self.num_prior_slots):
            _, cov, coords = (self._buffers[name] for name in slot_names(slot))
            if same_atlas(coords_R3, coords) and bool(cov.diagonal().sum() > 0):
                return slot
        return None

    def prior_for(self, coords_R3: Tensor) -> tuple[Tensor, Tensor] | None:
        """(mu_R, cov_RR) of the slot fitted on the atlas at `coords_R3`, or None when no slot was."""
        slot = self.prior_slot(coords_R3)
        if slot is None:
            return None
        mu, cov, _ = (self._buffers[name] for name in slot_names(slot))
        return mu, cov

    def prior_fits(self, coords_R3: Tensor) -> bool:
        """Whether a prior slot was fitted on the atlas at `coords_R3`."""
        return self.prior_for(coords_R3) is not None

    def prior_patches(
        self, signal_BRT: Tensor, coords_R3: Tensor, mask_BL: Tensor, context: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The Gaussian prior of every token: prior_BLP. The statistics fitted on the atlas at `coords_R3`, else
        the window's own covariance only; with `model.prior_context` and a `context` (context_cov_BRR,
        context_n_B), the fitted covariance moved toward each window's recording context."""
        B, R, T = signal_BRT.shape
        c = self.config
        mu, cov = self.prior_for(coords_R3) or (None, None)
        scale = None
        if c.prior_context and context is not None:
            if cov is None:  # another atlas: no population covariance, the context's own moves from the identity
                mu, cov = torch.zeros(R, device=signal_BRT.device), torch.eye(R, device=signal_BRT.device)
            scale = float(torch.diagonal(cov.double()).mean())
            cov = with_context(cov.double(), context[0], context[1], c.prior_context)
        mask_BRN = mask_BL.reshape(B, R, T // c.patch_size)
        prior_BRT = impute(signal_BRT, mask_BRN, mu, cov, c.patch_size, c.prior_ridge, c.prior_shrinkage, scale=scale)
        return self.patchify(prior_BRT)
