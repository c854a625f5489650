"""A synthetic cohort that looks like parcellated fMRI and carries its ground truth.

Signal model per recording (parcels of the Seitzman 2018 300-ROI atlas, TR 0.72 s):

    neural_k(t)  white noise per network k, mixed across networks by a coupling matrix C(subject)
    z_k(t)       neural_k convolved with the canonical (SPM double-gamma) HRF, band-passed 0.01-0.1 Hz
    x_r(t)       a_net * z_net(r)(t) + sqrt(1 - a_net^2) * private_r(t) + global(t) + thermal noise
    task runs    + gain_r * (block design convolved with the HRF) in Visual parcels only
    BOLD_r(t)    baseline_r * (1 + 0.01 * x_r(t)) + slow linear drift   (scanner units, ~1% fluctuations)

Phenotype effects (the ground truth the analyses must recover):
    age             DefaultMode<->FrontoParietal coupling rises with age; DefaultMode coherence falls
    clinical_score  Salience<->DefaultMode coupling rises with the score
    sex             SomatomotorDorsal<->Auditory coupling differs by sex
    null_trait      no effect on anything: no model may predict it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.data.format import Atlas
from brainlm.progress import bar
from brainlm.recordings.atlas import seitzman_atlas

SYNTH_VERSION = 1
AGE_PAIR = ("DefaultMode", "FrontoParietal")
CLINICAL_PAIR = ("Salience", "DefaultMode")
SEX_PAIR = ("SomatomotorDorsal", "Auditory")
TASK_NETWORK = "Visual"


@dataclass
class SynthConfig:
    subjects: int = 40
    """Number of subjects."""
    seed: int = 0
    """Random seed."""
    runs: int = 2
    """Recordings per subject."""
    task_fraction: float = 0.25
    """Share of recordings that are visual block-design task runs."""
    timepoints: int = 490
    """Timepoints per recording."""
    tr: float = 0.72
    """Repetition time in seconds."""
    parcels: int | None = None
    """Use a network-stratified subset of the 300 parcels (small tests); default all."""
    nifti: bool = False
    """Also write 4D NIfTI volumes (BIDS derivatives names) and an atlas label image."""
    voxel_mm: float = 5.0
    """Voxel size of the NIfTI volumes."""
    # effect sizes (coupling correlations per standard deviation of the phenotype)
    age_coupling: float = 0.3
    age_coherence: float = 0.12
    clinical_coupling: float = 0.25
    sex_coupling: float = 0.25
    base_coupling: float = 0.1
    coherence: float = 0.75
    global_amplitude: float = 0.3
    thermal_noise: float = 0.3
    task_amplitude: float = 2.0
    block_on_s: float = 21.6
    block_off_s: float = 21.6


def subset(atlas: Atlas, n: int | None) -> Atlas:
    """``n`` parcels evenly spaced through the atlas's network-ordered rows: every network keeps its share."""
    if n is None or n >= atlas.num_parcels:
        return atlas
    if n < 20:
        raise ValueError(f"--parcels {n}: use at least 20 so that the networks keep several parcels each")
    order = sorted(range(atlas.num_parcels), key=lambda i: (atlas.networks[i], i))
    keep = sorted(order[int(j)] for j in np.linspace(0, atlas.num_parcels - 1, n).round())
    return Atlas(
        f"{atlas.name}_{n}",
        [atlas.labels[i] for i in keep],
        [atlas.coords_mm[i] for i in keep],
        [atlas.networks[i] for i in keep],
    )


def canonical_hrf(tr: float, duration_s: float = 32.0) -> np.ndarray:
    """SPM's double-gamma HRF sampled at ``tr``, unit peak."""
    from scipy.stats import gamma

    t = np.arange(0.0, duration_s, tr)
    h = gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6.0
    return h / h.max()


def bandpass(x: np.ndarray, tr: float, low: float = 0.01, high: float = 0.1) -> np.ndarray:
    """Zero-phase FFT band-pass along the last axis."""
    freqs = np.fft.rfftfreq(x.shape[-1], d=tr)
    spec = np.fft.rfft(x, axis=-1)
    spec[..., (freqs < low) | (freqs > high)] = 0
    return np.fft.irfft(spec, n=x.shape[-1], axis=-1)


def slow_noise(rng: np.random.Generator, n: int, t: int, tr: float, hrf: np.ndarray) -> np.ndarray:
    """``n`` unit-variance slow signals: white noise through the HRF, band-passed to 0.01-0.1 Hz."""
    pad = len(hrf)
    white = rng.standard_normal((n, t + pad))
    conv = np.apply_along_axis(lambda v: np.convolve(v, hrf)[pad : pad + t], 1, white)
    out = bandpass(conv, tr)
    return out / out.std(axis=1, keepdims=True)


def block_regressor(t: int, tr: float, on_s: float, off_s: float, hrf: np.ndarray) -> np.ndarray:
    """Off/on block design convolved with the HRF, unit peak (starts with an off block)."""
    times = np.arange(t) * tr
    boxcar = ((times % (on_s + off_s)) >= off_s).astype(float)
    reg = np.convolve(boxcar, hrf)[:t]
    return reg / max(reg.max(), 1e-12)


def coupling_matrix(networks: list[str], pheno: dict, cfg: SynthConfig) -> np.ndarray:
    """Correlation between the network signals of one subject (positive definite)."""
    k = len(networks)
    c = np.full((k, k), cfg.base_coupling)
    np.fill_diagonal(c, 1.0)
    index = {n: i for i, n in enumerate(networks)}

    def add(pair: tuple[str, str], value: float) -> None:
        i, j = index[pair[0]], index[pair[1]]
        c[i, j] += value
        c[j, i] += value

    add(AGE_PAIR, cfg.age_coupling * pheno["age_z"])
    add(CLINICAL_PAIR, cfg.clinical_coupling * pheno["clinical_score"])
    add(SEX_PAIR, cfg.sex_coupling * (1.0 if pheno["sex"] == "M" else -1.0))
    w, v = np.linalg.eigh(c)  # clip to positive definite, keep unit diagonal
    c = v @ np.diag(np.clip(w, 0.05, None)) @ v.T
    d = np.sqrt(np.diag(c))
    return c / np.outer(d, d)


def make_phenotypes(rng: np.random.Generator, n: int) -> pd.DataFrame:
    age = rng.uniform(20, 80, n).round(1)
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:04d}" for i in range(n)],
            "age": age,
            "sex": rng.choice(["F", "M"], n),
            "clinical_score": rng.standard_normal(n).round(3),
            "null_trait": rng.standard_normal(n).round(3),
        }
    )


def simulate_recording(
    atlas: Atlas,
    pheno: dict,
    condition: str,
    cfg: SynthConfig,
    rng: np.random.Generator,
    baseline: np.ndarray,
) -> np.ndarray:
    """One recording in scanner units, ``[R, T]`` float32."""
    networks = sorted(set(atlas.networks) - {"unassigned"})
    net_of = np.array([networks.index(n) if n in networks else -1 for n in atlas.networks])
    t, tr = cfg.timepoints, cfg.tr
    hrf = canonical_hrf(tr)
    chol = np.linalg.cholesky(coupling_matrix(networks, pheno, cfg))
    z = chol @ slow_noise(rng, len(networks), t, tr, hrf)  # coupled network signals [K, T]
    coherence = np.full(len(networks), cfg.coherence)
    coherence[networks.index("DefaultMode")] -= cfg.age_coherence * pheno["age_z"]
    a = np.where(net_of >= 0, coherence[np.maximum(net_of, 0)], 0.0)[:, None]
    x = a * z[np.maximum(net_of, 0)] + np.sqrt(1 - a**2) * slow_noise(rng, len(net_of), t, tr, hrf)
    x += cfg.global_amplitude * slow_noise(rng, 1, t, tr, hrf)
    x += cfg.thermal_noise * rng.standard_normal(x.shape)
    if condition == "task":
        visual = np.array([n == TASK_NETWORK for n in atlas.networks])
        gain = rng.uniform(0.7, 1.3, int(visual.sum()))[:, None]
        x[visual] += cfg.task_amplitude * gain * block_regressor(t, tr, cfg.block_on_s, cfg.block_off_s, hrf)
    drift = rng.normal(0, 0.5, (len(net_of), 1)) * np.linspace(-1, 1, t)[None]
    return (baseline[:, None] * (1 + 0.01 * (x + drift))).astype(np.float32)


def synth(out: str | Path, cfg: SynthConfig) -> dict:
    """Write the cohort to ``out``; returns the ground truth (also written as ``truth.json``)."""
    out = Path(out)
    (out / "recordings").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    atlas = subset(seitzman_atlas(), cfg.parcels)
    participants = make_phenotypes(rng, cfg.subjects)
    age_mean, age_std = 50.0, 60 / np.sqrt(12)  # of U(20, 80)
    n_rec = cfg.subjects * cfg.runs
    n_task = round(cfg.task_fraction * n_rec)
    is_task = np.zeros(n_rec, bool)
    is_task[rng.choice(n_rec, n_task, replace=False)] = True

    atlas_table = pd.DataFrame(
        {
            "index": np.arange(1, atlas.num_parcels + 1),
            "name": atlas.labels,
            "x": atlas.coords()[:, 0],
            "y": atlas.coords()[:, 1],
            "z": atlas.coords()[:, 2],
            "network": atlas.networks,
        }
    )
    atlas_table.to_csv(out / "atlas.tsv", sep="\t", index=False)
    participants.to_csv(out / "participants.tsv", sep="\t", index=False)
    grid = _label_grid(atlas, cfg.voxel_mm, out) if cfg.nifti else None

    rows, truth_recs = [], {}
    for i, row in enumerate(bar(participants.to_dict(orient="records"), desc="synth subjects", unit="subj")):
        pheno = dict(row, age_z=(row["age"] - age_mean) / age_std)
        sub = row["participant_id"]
        sub_rng = np.random.default_rng([cfg.seed, i])
        baseline = sub_rng.uniform(500, 1500, atlas.num_parcels) * sub_rng.uniform(0.9, 1.1)
        for run in range(cfg.runs):
            condition = "task" if is_task[i * cfg.runs + run] else "rest"
            rec_rng = np.random.default_rng([cfg.seed, i, run + 1])
            bold = simulate_recording(atlas, pheno, condition, cfg, rec_rng, baseline)
            rec_id = f"{sub}_task-{condition}_run-{run + 1}"
            np.save(out / "recordings" / f"{rec_id}.npy", bold)
            rows.append(
                {
                    "file": f"recordings/{rec_id}.npy",
                    "subject": sub,
                    "condition": condition,
                    "tr": cfg.tr,
                    "run": run + 1,
                    "recording": rec_id,
                }
            )
            truth_recs[rec_id] = {"subject": sub, "condition": condition}
            if grid is not None:
                _write_nifti(out, sub, rec_id, bold, grid, cfg, rec_rng)
    pd.DataFrame(rows).to_csv(out / "recordings.tsv", sep="\t", index=False)
    if cfg.nifti:
        participants.to_csv(out / "bids" / "participants.tsv", sep="\t", index=False)

    truth = {
        "synth_version": SYNTH_VERSION,
        "config": cfg.__dict__,
        "atlas": atlas.name,
        "networks": sorted(set(atlas.networks)),
        "parcel_networks": atlas.networks,
        "effects": {
            "age": {
                "coupling": {"|".join(AGE_PAIR): cfg.age_coupling},
                "coherence": {"DefaultMode": -cfg.age_coherence},
                "per": "SD of age",
            },
            "clinical_score": {"coupling": {"|".join(CLINICAL_PAIR): cfg.clinical_coupling}, "per": "SD"},
            "sex": {"coupling": {"|".join(SEX_PAIR): cfg.sex_coupling}, "per": "M=+1, F=-1"},
            "null_trait": "no effect on any signal: a model that predicts it is leaking",
        },
        "task": {
            "condition": "task",
            "network": TASK_NETWORK,
            "block_on_s": cfg.block_on_s,
            "block_off_s": cfg.block_off_s,
            "amplitude": cfg.task_amplitude,
        },
        "recordings": truth_recs,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def _label_grid(atlas: Atlas, voxel_mm: float, out: Path) -> dict:
    """A label image on a coarse MNI grid: each parcel a small blob around its coordinate."""
    import nibabel as nib

    coords = atlas.coords()
    lo = np.floor((coords.min(axis=0) - 2 * voxel_mm) / voxel_mm) * voxel_mm
    shape = tuple(int(v) for v in np.ceil((coords.max(axis=0) + 2 * voxel_mm - lo) / voxel_mm) + 1)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = lo
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk * voxel_mm + lo
    labels = np.zeros(len(xyz), np.int16)
    # Every parcel first takes the free voxel nearest its centre, so none is lost on the coarse grid ...
    dist = np.linalg.norm(xyz[None] - coords[:, None], axis=2)  # [R, V]
    for r in range(len(coords)):
        for v in np.argsort(dist[r])[:50]:
            if labels[v] == 0:
                labels[v] = r + 1
                break
    # ... then free voxels within one voxel of a centre join the nearest parcel.
    nearest = dist.argmin(axis=0)
    grow = (labels == 0) & (dist.min(axis=0) <= voxel_mm)
    labels[grow] = nearest[grow] + 1
    label_img = labels.reshape(shape)
    nib.save(nib.Nifti1Image(label_img, affine), out / "atlas_dseg.nii.gz")
    return {"labels": label_img, "affine": affine}


def _write_nifti(
    out: Path, sub: str, rec_id: str, bold: np.ndarray, grid: dict, cfg: SynthConfig, rng: np.random.Generator
) -> None:
    """A 4D BOLD volume whose voxels carry their parcel's signal plus voxel noise (BIDS derivatives names)."""
    import nibabel as nib

    labels = grid["labels"]
    inside = labels > 0
    data = np.zeros((*labels.shape, bold.shape[1]), np.float32)
    vox = bold[labels[inside] - 1]
    data[inside] = vox * (1 + 0.002 * rng.standard_normal(vox.shape)).astype(np.float32)
    img = nib.Nifti1Image(data, grid["affine"])
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = cfg.tr
    func = out / "bids" / sub / "func"
    func.mkdir(parents=True, exist_ok=True)
    stem = f"{rec_id}_space-MNI152NLin2009cAsym_desc-preproc_bold"
    nib.save(img, func / f"{stem}.nii.gz")
    (func / f"{stem}.json").write_text(
        json.dumps({"RepetitionTime": cfg.tr, "TaskName": rec_id.split("task-")[1].split("_")[0]})
    )
