"""fMRIPrep derivatives as labs have them: two output spaces, confounds with motion columns and n/a first rows, JSON
sidecars with their TR, participants.tsv at the raw BIDS root, a nilearn-style lookup-table atlas; and the small
real Schaefer-100 recording with its confounds that the brainfc wheel ships."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainlm.exceptions import InputError
from data_prep.build import BuildConfig, build
from tests.conftest import ROOT

SPACES = ("MNI152NLin2009cAsym", "T1w")
SHAPE, PARCELS = (8, 9, 10), 4
MOTION = [f"{k}_{a}" for k in ("trans", "rot") for a in "xyz"]


def write_atlas(folder: Path) -> tuple[Path, Path]:
    """A 3D label image of 4 parcels (label values 10, 20, 30, 40) and its lookup table (index, name, network)."""
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[1:4, 1:4, 1:5] = 10
    labels[4:7, 1:4, 1:5] = 20
    labels[1:4, 5:8, 5:9] = 30
    labels[4:7, 5:8, 5:9] = 40
    image = folder / "atlas_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([5.0, 5.0, 5.0, 1.0])), image)
    lut = folder / "atlas_lut.tsv"
    lut.write_text(
        "index\tname\tnetwork\n0\tBackground\tnone\n10\tVisA\tVis\n20\tVisB\tVis\n30\tDMN1\tDefault\n40\tDMN2\tDefault\n"
    )
    return image, lut


def write_run(func: Path, sub: str, space: str, T: int, tr: float, rng: np.random.Generator, fd: np.ndarray) -> None:
    stem = f"sub-{sub}_task-rest_run-1"
    sources = rng.standard_normal((PARCELS, T)).cumsum(axis=1) * 0.3 + rng.standard_normal((PARCELS, T))
    data = np.zeros((*SHAPE, T), dtype=np.float32) + 100.0
    for k, (x0, y0, z0) in enumerate(((1, 1, 1), (4, 1, 1), (1, 5, 5), (4, 5, 5))):  # the parcels of write_atlas
        data[x0 : x0 + 3, y0 : y0 + 3, z0 : z0 + 4] += sources[k] + 0.1 * rng.standard_normal((3, 3, 4, T))
    img = nib.Nifti1Image(data, np.diag([5.0, 5.0, 5.0, 1.0]))
    img.header.set_zooms((5.0, 5.0, 5.0, tr))
    bold = func / f"{stem}_space-{space}_desc-preproc_bold.nii.gz"
    nib.save(img, bold)
    bold.with_name(bold.name.replace(".nii.gz", ".json")).write_text(json.dumps({"RepetitionTime": tr}))
    if space == SPACES[0]:  # one confounds table per run, beside its images
        base = {c: rng.standard_normal(T) * 0.05 for c in MOTION} | {
            "csf": rng.standard_normal(T),
            "white_matter": rng.standard_normal(T),
            "global_signal": sources.mean(0),
        }
        table = {}
        for c, v in base.items():  # fMRIPrep's expansions: derivative (n/a first row), powers
            d = np.r_[np.nan, np.diff(v)]
            table |= {c: v, f"{c}_derivative1": d, f"{c}_power2": v**2, f"{c}_derivative1_power2": d**2}
        table |= {"framewise_displacement": np.r_[np.nan, fd[1:]], "std_dvars": np.r_[np.nan, np.ones(T - 1)]}
        table |= {"cosine00": np.cos(np.linspace(0, np.pi, T))}
        pd.DataFrame(table).to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
        (func / f"{stem}_desc-confounds_timeseries.json").write_text("{}")


@pytest.fixture(scope="module")
def fmriprep(tmp_path_factory) -> dict:
    """raw BIDS root (participants.tsv) / derivatives/fmriprep (two spaces, 8 subjects, TR 2 s but one at 1 s)."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps({"Name": "fmriprep", "DatasetType": "derivative"}))
    rng = np.random.default_rng(0)
    subjects = [f"{i:02d}" for i in range(1, 9)]
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "age": np.arange(20, 28)}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    T = 120
    for s in subjects:
        func = deriv / f"sub-{s}" / "func"
        func.mkdir(parents=True)
        fd = np.full(T, 0.1)
        if s == "08":  # a restless subject: three quarters of the run over the scrubbing threshold
            fd[10:100] = 2.0
        tr = 1.0 if s == "07" else 2.0
        for space in SPACES:
            write_run(func, s, space, T, tr, rng, fd)
    image, lut = write_atlas(root.parent)
    return {"deriv": deriv, "image": image, "lut": lut, "root": root}


def cfg(fmriprep, out: Path, **kw) -> BuildConfig:
    return BuildConfig(
        inputs=str(fmriprep["deriv"]), out=str(out), atlas=str(fmriprep["image"]), atlas_table=str(fmriprep["lut"]),
        crop=40, val_frac=0.2, test_frac=0.2, progress=False, **kw,
    )  # fmt: skip


def test_two_output_spaces_need_a_choice(fmriprep, tmp_path):
    with pytest.raises(InputError, match=r"2 output spaces: MNI152NLin2009cAsym \(8 files\), T1w \(8 files\); choose"):
        build(cfg(fmriprep, tmp_path / "a"))
    with pytest.raises(InputError, match=r"--space MNI305: no recording .* found MNI152NLin2009cAsym, T1w"):
        build(cfg(fmriprep, tmp_path / "b", space="MNI305"))


def test_a_space_builds_with_entities_participants_from_the_bids_root_and_a_lookup_table(fmriprep, tmp_path):
    m = build(cfg(fmriprep, tmp_path / "s", space="MNI152NLin2009cAsym", tr=2.0))
    rec = m.recordings[0]
    assert rec["entities"]["space"] == "MNI152NLin2009cAsym" and rec["entities"]["desc"] == "preproc"
    assert m.subjects["01"]["age"] == 20  # found at the raw dataset's root, above derivatives/
    assert m.atlas.labels == ["VisA", "VisB", "DMN1", "DMN2"] and m.atlas.networks == [
        "Vis",
        "Vis",
        "Default",
        "Default",
    ]
    # No x, y, z in the lookup table: each parcel's centre of mass, from the image, in mm.
    assert m.atlas.coords_mm[0] == [10.0, 10.0, 12.5] and m.atlas.coords_mm[3] == [25.0, 30.0, 32.5]
    skipped = {s["recording"]: s["reason"] for s in m.skipped}
    assert "TR 1 s differs from the build's TR 2 s" in skipped["sub-07_task-rest_run-1"]


def test_several_trs_resample_with_the_source_tr_recorded(fmriprep, tmp_path):
    m = build(cfg(fmriprep, tmp_path / "r", space="T1w", tr=2.0, resample=True))
    resampled = next(r for r in m.recordings if r["subject"] == "07")
    assert resampled["source_tr"] == 1.0 and resampled["tr"] == 2.0 and resampled["n_timepoints"] == 60


def test_scrubbing_removes_frames_and_skips_a_recording_left_too_short(fmriprep, tmp_path):
    m = build(cfg(fmriprep, tmp_path / "d", space="MNI152NLin2009cAsym", tr=2.0, denoise="scrubbing", high_pass=0.01))
    kept = {r["subject"]: r for r in m.recordings}
    assert kept["01"]["denoise"] == "scrubbing" and kept["01"].get("frames_scrubbed", 0) < 10
    reason = {s["recording"]: s["reason"] for s in m.skipped}["sub-08_task-rest_run-1"]
    assert "high-motion frames were scrubbed" in reason and "fewer than one crop of 40" in reason
    assert m.args["denoise"] == "scrubbing" and m.args["high_pass"] == 0.01  # the strategy is in the manifest
    with pytest.raises(InputError, match="--denoise and --confounds both choose the confounds"):
        build(cfg(fmriprep, tmp_path / "e", space="T1w", denoise="simple", confounds=["csf"]))


def test_participants_given_explicitly_and_conflicting_rows_are_refused(fmriprep, tmp_path):
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tage\nsub-01\t30\nsub-01\t31\n")
    with pytest.raises(InputError, match="participant 01 is listed twice with different values"):
        build(cfg(fmriprep, tmp_path / "p", space="T1w", tr=2.0, participants=str(table)))


@pytest.fixture(scope="module")
def brainfc(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import real_cohorts
    finally:
        sys.path.pop(0)
    return real_cohorts.write_cohort(tmp_path_factory.mktemp("brainfc"), "brainfc", ROOT / ".whl" / "real")


def test_the_real_brainfc_recording_with_its_confounds(brainfc, tmp_path):
    """150 real frames of Schaefer-100 at TR 2 s: confounds regressed out (an n/a first row takes the column mean)."""
    cols = ["motion_offset_x", "motion_offset_y", "motion_offset_z", "framewise_displacement", "csf", "white_matter"]
    common = dict(inputs=str(brainfc), crop=100, stride=25, val_frac=0.0, test_frac=0.0, progress=False)
    plain = build(BuildConfig(out=str(tmp_path / "plain"), **common))
    cleaned = build(BuildConfig(out=str(tmp_path / "clean"), confounds=cols, **common))
    assert cleaned.recordings[0]["confound_columns"] == cols and cleaned.atlas.num_parcels == 100
    a = np.load(tmp_path / "plain" / "parcellated" / "sub-rest01_task-rest_run-1.npy")
    b = np.load(tmp_path / "clean" / "parcellated" / "sub-rest01_task-rest_run-1.npy")
    assert a.shape == b.shape == (100, 150) and np.isfinite(b).all()
    confounds = pd.read_csv(next(brainfc.glob("*_desc-confounds_timeseries.tsv")), sep="\t", na_values="n/a")[cols]
    X = confounds.fillna(confounds.mean()).to_numpy()
    X = np.c_[X - X.mean(axis=0), np.ones(len(X))]
    leftover = np.abs(np.linalg.lstsq(X, b.T - b.T.mean(axis=0), rcond=None)[0][:-1]).max()
    assert leftover < 1e-3 < np.abs(np.linalg.lstsq(X, a.T - a.T.mean(axis=0), rcond=None)[0][:-1]).max()
    assert plain.plan_sha256 != cleaned.plan_sha256
