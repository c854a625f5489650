"""The data-prep stage on real files: arrays in every format, NIfTI written with nibabel, a BIDS tree, S3."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import webdataset as wds

from brainlm.data.format import Manifest, decode_signal
from brainlm.data.shardset import ShardSet
from brainlm.data.store import open_store, register_webdataset
from brainlm.exceptions import InputError, ShardError
from data_prep.build import BuildConfig, BuildError, build
from tests.conftest import ROOT, make_signal, run_cli, write_atlas_table


def read_split(root: str, split: str) -> list[tuple[np.ndarray, dict]]:
    register_webdataset()
    out = []
    for url in ShardSet.open(root).urls(split):
        for sample in wds.WebDataset(url, shardshuffle=False):
            out.append((decode_signal(sample["signal.npy"]), json.loads(sample["json"])))
    return out


def small_build(inputs, out, **kw) -> Manifest:
    kw = {"crop": 20, "stride": 10, "samples_per_shard": 4, "tr": 0.8, "progress": False, **kw}
    return build(BuildConfig(inputs=str(inputs), out=str(out), **kw))


# -- arrays, scaling, splits ---------------------------------------------------------------------------------


def test_array_build_scales_with_training_statistics_only(array_cohort, tmp_path):
    manifest = small_build(array_cohort, tmp_path / "out", val_frac=0.2, test_frac=0.2)
    splits = {k: set(v["subjects"]) for k, v in manifest.splits.items()}
    assert len(splits["val"]) == 1 and len(splits["test"]) == 1 and len(splits["train"]) == 4
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])

    # The statistics are exactly the per-parcel median / IQR of the training recordings (each demeaned on its
    # own first), nothing else.
    def demeaned(path):
        x = np.load(path).astype(np.float64)
        return x - np.median(x, axis=1, keepdims=True)

    train_files = sorted(
        p for p in array_cohort.glob("*.npy") if p.name[4:6] in {f"{int(s):02d}" for s in splits["train"]}
    )
    data = np.concatenate([demeaned(p) for p in train_files], axis=1)
    q25, med, q75 = np.percentile(data, [25, 50, 75], axis=1)
    assert manifest.scaling["normalize"] == "demean"
    np.testing.assert_allclose(manifest.scaling["center"], med, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(manifest.scaling["scale"], q75 - q25, rtol=1e-5)
    everything = np.concatenate([demeaned(p) for p in array_cohort.glob("*.npy")], axis=1)
    q25_all, q75_all = np.percentile(everything, [25, 75], axis=1)
    assert not np.allclose(q75_all - q25_all, q75 - q25, rtol=1e-4)  # test subjects would change it

    # Every crop in the shards is (x - median) / IQR of its window, in float16.
    samples = read_split(str(tmp_path / "out"), "test")
    assert len(samples) == manifest.num_samples("test") == 2 * 4  # 2 runs x crops at 0, 10, 20, 30 of 53
    for signal_RT, meta in samples:
        raw = demeaned(array_cohort / f"sub-{meta['subject']}_task-{meta['condition']}_run-{meta['run']}_bold.npy")
        expected = (raw[:, meta["start"] : meta["start"] + 20] - med[:, None]) / (q75 - q25)[:, None]
        assert signal_RT.dtype == np.float16 and signal_RT.shape == (7, 20)
        np.testing.assert_allclose(signal_RT, expected, atol=2e-3, rtol=2e-3)
        assert meta["phenotypes"]["age"] in (21, 34, 45, 52, 67, 70)
        assert meta["tr"] == 0.8 and meta["split"] == "test"


def test_splits_are_deterministic_by_subject_and_explicit_file_wins(array_cohort, tmp_path):
    a = small_build(array_cohort, tmp_path / "a", seed=3)
    b = small_build(array_cohort, tmp_path / "b", seed=3)
    assert a.splits == b.splits and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    c = small_build(array_cohort, tmp_path / "c", seed=4)
    assert c.splits != a.splits or c.shards != a.shards  # the seed matters

    split_file = tmp_path / "splits.tsv"
    pd.DataFrame(
        {
            "participant_id": [f"sub-{s:02d}" for s in range(1, 7)],
            "split": ["train", "train", "train", "val", "test", "test"],
        }
    ).to_csv(split_file, sep="\t", index=False)
    d = small_build(array_cohort, tmp_path / "d", splits=str(split_file))
    assert d.splits["test"]["subjects"] == ["05", "06"] and d.splits["val"]["subjects"] == ["04"]

    pd.DataFrame({"subject": ["01"], "split": ["train"]}).to_csv(split_file, sep="\t", index=False)
    with pytest.raises(Exception, match="5 subject\\(s\\) have no split"):
        small_build(array_cohort, tmp_path / "e", splits=str(split_file))


def test_every_array_format_and_orientation(tmp_path):
    root = tmp_path / "arrays"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    rng = np.random.default_rng(5)
    sigs = {i: make_signal(rng, 7, 41 + i) for i in range(5)}
    np.save(root / "a.npy", sigs[0])  # [R, T]
    np.save(root / "b.npy", sigs[1].T)  # [T, R]
    scipy.io.savemat(root / "c.mat", {"ts": sigs[2].T})
    pd.DataFrame(sigs[3].T, columns=[f"p{i}" for i in range(7)]).to_csv(root / "d.tsv", sep="\t", index=False)
    np.savetxt(root / "e.csv", sigs[4].T, delimiter=",")
    pd.DataFrame(
        {
            "file": ["a.npy", "b.npy", "c.mat", "d.tsv", "e.csv"],
            "subject": ["s1", "s2", "s3", "s4", "s5"],
            "condition": ["rest"] * 5,
            "tr": [0.8] * 5,
        }
    ).to_csv(root / "recordings.tsv", sep="\t", index=False)
    manifest = small_build(root, tmp_path / "out", val_frac=0, test_frac=0)
    assert manifest.orientation == {"RT": 1, "TR": 4}
    assert not manifest.skipped
    store = open_store(tmp_path / "out")
    for rec in manifest.recordings:
        i = "abcde".index(Path(rec["source"]).stem)
        stored = np.load(store.url_of(f"parcellated/{rec['id']}.npy"))
        np.testing.assert_allclose(stored, sigs[i], rtol=1e-5)


def test_ambiguous_orientation_is_an_error_naming_the_file(tmp_path):
    root = tmp_path / "arr"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    np.save(root / "sub-01_task-rest_bold.npy", make_signal(np.random.default_rng(0), 7, 7))
    np.save(root / "sub-02_task-rest_bold.npy", make_signal(np.random.default_rng(1), 7, 30))
    manifest = small_build(root, tmp_path / "out", val_frac=0, test_frac=0)
    (skip,) = manifest.skipped
    assert "sub-01_task-rest_bold.npy" in skip["reason"] and "ambiguous" in skip["reason"]


# -- bad input -----------------------------------------------------------------------------------------------


def test_bad_inputs_are_skipped_with_reasons_and_the_build_goes_on(array_cohort, tmp_path):
    rng = np.random.default_rng(9)
    nan = make_signal(rng, 7, 53)
    nan[3, 10] = np.nan
    np.save(array_cohort / "sub-07_task-rest_run-1_bold.npy", nan)
    flat = make_signal(rng, 7, 53)
    flat[2] = 1000.0
    np.save(array_cohort / "sub-08_task-rest_run-1_bold.npy", flat)
    np.save(array_cohort / "sub-09_task-rest_run-1_bold.npy", make_signal(rng, 7, 12))  # fewer than one crop
    np.save(array_cohort / "sub-10_task-rest_run-1_bold.npy", make_signal(rng, 5, 53))  # 5 parcels, atlas has 7
    (array_cohort / "sub-11_task-rest_run-1_bold.npy").write_bytes(b"not an array at all")
    manifest = small_build(array_cohort, tmp_path / "out")
    reasons = {s["recording"]: s["reason"] for s in manifest.skipped}
    assert set(reasons) == {f"sub-{i:02d}_task-rest_run-1" for i in (7, 8, 9, 10, 11)}
    assert "non-finite" in reasons["sub-07_task-rest_run-1"] and "p3" in reasons["sub-07_task-rest_run-1"]
    assert "flat parcel" in reasons["sub-08_task-rest_run-1"] and "p2" in reasons["sub-08_task-rest_run-1"]
    assert "fewer than one crop of 20" in reasons["sub-09_task-rest_run-1"]
    assert "no axis of length 7" in reasons["sub-10_task-rest_run-1"]
    assert "unreadable" in reasons["sub-11_task-rest_run-1"]
    for rec, reason in reasons.items():
        assert f"{rec}_bold.npy" in reason  # each reason names its file
    assert len(manifest.recordings) == 12


def test_a_build_where_everything_is_skipped_fails(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    np.save(root / "sub-01_task-rest_bold.npy", np.zeros((7, 50), np.float32))
    with pytest.raises(BuildError, match="every recording was skipped"):
        small_build(root, tmp_path / "out")
    proc = run_cli(
        "-m",
        "data_prep",
        "build",
        "--inputs",
        str(root),
        "--out",
        str(tmp_path / "o2"),
        "--tr",
        "1",
        "--crop",
        "20",
        "--quiet",
    )
    assert proc.returncode == 2 and "every recording was skipped" in proc.stderr and "flat parcel" in proc.stderr
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_tr_mismatch_is_skipped_unless_resampled(tmp_path):
    root = tmp_path / "tr"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    rng = np.random.default_rng(2)
    for i in range(3):
        np.save(root / f"r{i}.npy", make_signal(rng, 7, 60))
    pd.DataFrame({"file": ["r0.npy", "r1.npy", "r2.npy"], "subject": ["a", "b", "c"], "tr": [0.8, 0.8, 1.6]}).to_csv(
        root / "recordings.tsv", sep="\t", index=False
    )
    m = small_build(root, tmp_path / "o1", val_frac=0, test_frac=0)
    assert [s["recording"] for s in m.skipped] == ["r2"] and "TR 1.6 s differs" in m.skipped[0]["reason"]
    m = small_build(root, tmp_path / "o2", val_frac=0, test_frac=0, resample=True)
    assert not m.skipped
    rec = next(r for r in m.recordings if r["id"] == "r2")
    # An anti-aliased polyphase filter (scipy's resample_poly): 60 samples at 1.6 s -> 120 at 0.8 s, the same 96 s.
    assert rec["tr"] == 0.8 and rec["n_timepoints"] == 120 and rec["source_tr"] == 1.6


def test_a_tr_that_is_not_a_positive_number_is_refused(tmp_path):
    from data_prep.build import BuildConfig

    root = tmp_path / "badtr"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    rng = np.random.default_rng(3)
    trs = [0.8, -0.72, 0.0, float("nan"), float("inf")]
    for i in range(len(trs)):
        np.save(root / f"r{i}.npy", make_signal(rng, 7, 60))
    table = pd.DataFrame({"file": [f"r{i}.npy" for i in range(len(trs))], "subject": list("abcde"), "tr": trs})
    table.to_csv(root / "recordings.tsv", sep="\t", index=False)
    m = small_build(root, tmp_path / "o", val_frac=0, test_frac=0, tr=0.8)
    reasons = {s["recording"]: s["reason"] for s in m.skipped}
    # nan reads as a missing value (then --tr applies); -0.72, 0 and inf are said to be what they are
    assert set(reasons) == {"r1", "r2", "r4"}, reasons
    assert all("not a positive number of seconds" in r for r in reasons.values()), reasons
    json.loads((tmp_path / "o" / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))  # strict JSON
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="--tr must be a positive number of seconds"):
            BuildConfig(inputs=str(root), out=str(tmp_path / "x"), tr=bad)


# -- NIfTI and BIDS ------------------------------------------------------------------------------------------


def _label_image(shape=(7, 8, 9)) -> np.ndarray:
    labels = np.zeros(shape, np.int16)
    labels[:3, :4] = 1
    labels[3:, :4] = 2
    labels[:3, 4:] = 3
    labels[3:, 4:, :5] = 4
    return labels


def test_nifti_folder_parcellation_and_atlas_mismatch(tmp_path):
    root = tmp_path / "nifti"
    root.mkdir()
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    labels = _label_image()
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "atlas.nii.gz")
    rng = np.random.default_rng(0)
    truth = {}
    for s in (1, 2, 3):
        parcel = make_signal(rng, 4, 31)
        vol = np.zeros((*labels.shape, 31), np.float32)
        for k in range(4):
            vol[labels == k + 1] = parcel[k]
        img = nib.Nifti1Image(vol, affine)
        img.header.set_zooms((3.0, 3.0, 3.0, 1.5))
        nib.save(img, root / f"sub-{s}_task-rest_bold.nii.gz")
        truth[str(s)] = parcel
    # one image on another grid: refused with a clear reason, the build goes on
    nib.save(nib.Nifti1Image(np.ones((6, 8, 9, 31), np.float32), affine), root / "sub-4_task-rest_bold.nii.gz")
    m = small_build(root, tmp_path / "out", atlas=str(tmp_path / "atlas.nii.gz"), tr=None, val_frac=0, test_frac=0)
    assert m.atlas.num_parcels == 4 and m.tr == 1.5  # TR from the header
    (skip,) = m.skipped
    assert "sub-4_task-rest_bold.nii.gz" in skip["reason"] and "does not match the atlas" in skip["reason"]
    # centre-of-mass coordinates in mm
    np.testing.assert_allclose(m.atlas.coords_mm[0], [3.0, 4.5, 12.0])
    store = open_store(tmp_path / "out")
    for s, parcel in truth.items():
        stored = np.load(store.url_of(f"parcellated/sub-{s}_task-rest.npy"))
        np.testing.assert_allclose(stored, parcel, rtol=1e-5)


def test_synthetic_nifti_bids_tree_matches_its_arrays(tmp_path):
    from data_prep.synth import SynthConfig, synth

    synth(tmp_path / "c", SynthConfig(subjects=2, runs=1, timepoints=45, nifti=True, task_fraction=0.5))
    m = small_build(
        tmp_path / "c" / "bids",
        tmp_path / "out",
        atlas=str(tmp_path / "c" / "atlas_dseg.nii.gz"),
        atlas_table=str(tmp_path / "c" / "atlas.tsv"),
        tr=None,
        val_frac=0,
        test_frac=0,
    )
    assert m.atlas.num_parcels == 300 and m.tr == 0.72 and not m.skipped
    assert m.atlas.networks.count("Visual") == 37
    assert m.subjects["0001"]["age"] > 0  # phenotypes from the tree's participants.tsv
    store = open_store(tmp_path / "out")
    for rec in m.recordings:
        parcellated = np.load(store.url_of(f"parcellated/{rec['id']}.npy"))
        array = np.load(tmp_path / "c" / "recordings" / f"sub-{rec['subject']}_task-{rec['condition']}_run-1.npy")
        corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(parcellated, array, strict=True)]
        assert min(corr) > 0.95


# -- the synthetic cohort's ground truth ---------------------------------------------------------------------


def test_synthetic_cohort_has_its_ground_truth(tmp_path):
    from scipy.stats import spearmanr

    from data_prep.synth import SynthConfig, block_regressor, canonical_hrf, synth

    cfg = SynthConfig(subjects=30, runs=2, timepoints=400, task_fraction=0.5, seed=7)
    truth = synth(tmp_path / "c", cfg)
    nets = np.array(truth["parcel_networks"])
    people = pd.read_csv(tmp_path / "c" / "participants.tsv", sep="\t")
    assert set(people.columns) == {"participant_id", "age", "sex", "clinical_score", "null_trait"}
    recs = pd.read_csv(tmp_path / "c" / "recordings.tsv", sep="\t")
    reg = block_regressor(cfg.timepoints, cfg.tr, cfg.block_on_s, cfg.block_off_s, canonical_hrf(cfg.tr))
    within, between, task_vis, task_other, rest_vis = [], [], [], [], []
    pair_fc, ages, nulls = [], [], []
    for row in recs.itertuples():
        x = np.load(tmp_path / "c" / row.file)
        # fMRI-like: ~1 % fluctuations around a baseline, most power in 0.01-0.1 Hz
        assert 400 < x.mean() < 1700 and 0.001 < (x.std(axis=1) / x.mean(axis=1)).mean() < 0.05
        detr = x - x.mean(axis=1, keepdims=True)
        spec = np.abs(np.fft.rfft(detr, axis=1)) ** 2
        f = np.fft.rfftfreq(x.shape[1], cfg.tr)
        assert spec[:, (f > 0.01) & (f < 0.1)].sum() / spec[:, f > 0.1].sum() > 3
        c = np.corrcoef(x)
        same = nets[:, None] == nets[None]
        valid = (nets[:, None] != "unassigned") & (nets[None] != "unassigned") & ~np.eye(len(nets), dtype=bool)
        within.append(c[same & valid].mean())
        between.append(c[~same & valid].mean())
        r_reg = np.array([np.corrcoef(v, reg)[0, 1] for v in x])
        if row.condition == "task":
            task_vis.append(r_reg[nets == "Visual"].mean())
            task_other.append(np.abs(r_reg[nets != "Visual"]).mean())
        else:
            rest_vis.append(np.abs(r_reg[nets == "Visual"]).mean())
        dmn, fpn = x[nets == "DefaultMode"].mean(0), x[nets == "FrontoParietal"].mean(0)
        pair_fc.append(np.corrcoef(dmn, fpn)[0, 1])
        person = people[people.participant_id == row.subject].iloc[0]
        ages.append(person.age)
        nulls.append(person.null_trait)
    assert np.mean(within) > np.mean(between) + 0.2
    assert np.mean(task_vis) > 0.45 and min(task_vis) > 0.25
    assert np.mean(task_other) < 0.15 and np.mean(rest_vis) < 0.15
    assert spearmanr(ages, pair_fc).statistic > 0.5  # coupling rises with age
    # The null trait does nothing: once age is accounted for, nothing is left for it to explain.
    ages, nulls, pair_fc = np.array(ages), np.array(nulls), np.array(pair_fc)
    residual = pair_fc - np.polyval(np.polyfit(ages, pair_fc, 1), ages)
    assert abs(spearmanr(nulls, residual).statistic) < 0.3
    assert truth["effects"]["null_trait"].startswith("no effect")


# -- resume after a kill, S3, round trips ---------------------------------------------------------------------


def test_a_changed_intermediate_is_parcellated_again_not_trusted(array_cohort, tmp_path, caplog):
    out = tmp_path / "o"
    first = small_build(array_cohort, out)
    rec = first.recordings[0]["id"]
    npy = out / "parcellated" / f"{rec}.npy"
    original = npy.read_bytes()
    np.save(npy, np.zeros((7, 53), np.float32))  # a valid array, but not what was parcellated
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data_prep"):
        again = small_build(array_cohort, out)
    assert npy.read_bytes() == original and again.shards == first.shards
    assert f"reused {len(first.recordings) + len(first.skipped) - 1} recording(s)" in caplog.text
    # Changed between the plan and the shards: the shards stage refuses it, naming the file.
    np.save(npy, np.zeros((7, 53), np.float32))
    for tar in (out / "shards").rglob("*.tar"):
        tar.unlink()
    with pytest.raises(ShardError, match=rf"{rec}.npy changed since the build parcellated it"):
        small_build(array_cohort, out, stage="shards")


def test_a_killed_build_takes_its_worker_pool_with_it(tmp_path):
    import psutil

    from data_prep.synth import SynthConfig, synth

    synth(tmp_path / "c", SynthConfig(subjects=10, runs=2, timepoints=250))
    args = ["-m", "data_prep", "build", "--inputs", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, workers, deadline = psutil.Process(proc.pid), [], time.time() + 120
    while len(workers) < 2:  # the pool's workers (not multiprocessing's resource tracker)
        assert proc.poll() is None and time.time() < deadline, "the build ended before its pool started"
        workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler of the build runs
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, "the build's pool workers outlived it"


def test_killed_build_leaves_nothing_half_written_and_resumes(tmp_path):
    from data_prep.synth import SynthConfig, synth

    synth(tmp_path / "c", SynthConfig(subjects=10, runs=2, timepoints=250))
    out = tmp_path / "out"
    args = [
        "-m",
        "data_prep",
        "build",
        "--inputs",
        str(tmp_path / "c"),
        "--out",
        str(out),
        "--crop",
        "50",
        "--stride",
        "5",
        "--samples-per-shard",
        "8",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((out / "_state" / "shards" / "train").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list((out / "_state" / "shards").rglob("*.json")))
    done = list((out / "shards" / "train").glob("*.tar"))
    assert done, "the build was killed before it wrote a shard: make the test cohort bigger"
    assert not (out / "manifest.json").exists()
    for tar in out.rglob("*.tar"):  # every visible shard is complete
        with tarfile.open(tar) as t:
            names = t.getnames()
        assert len(names) == 16 and all(n.endswith((".signal.npy", ".json")) for n in names)

    resumed = run_cli(*args[:-1])
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stdout.split("skipped ")[1].split()[0])
    assert skipped >= committed >= 1  # every shard committed before the kill is reused, not rewritten
    assert run_cli("-m", "data_prep", "inspect", str(out)).returncode == 0

    # The resumed shards are byte-identical to an uninterrupted build's.
    whole = tmp_path / "whole"
    assert run_cli(*[a if a != str(out) else str(whole) for a in args]).returncode == 0
    a = json.loads((out / "manifest.json").read_text())["shards"]
    b = json.loads((whole / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_corrupted_shard_is_rewritten_and_inspect_catches_it(array_cohort, tmp_path):
    out = tmp_path / "out"
    small_build(array_cohort, out)
    shard = next((out / "shards" / "train").glob("*.tar"))
    good = shard.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    clean = run_cli("-m", "data_prep", "inspect", str(out))
    assert clean.returncode == 0 and all(s["sha256"] in clean.stdout for s in manifest["shards"])  # every shard's
    shard.write_bytes(good[:-10] + b"0123456789")
    proc = run_cli("-m", "data_prep", "inspect", str(out))
    assert proc.returncode == 1 and f"{shard.name}: sha256/size" in proc.stdout
    small_build(array_cohort, out)
    assert shard.read_bytes() == good
    with pytest.raises(InputError, match="lies inside --inputs"):
        small_build(array_cohort, array_cohort / "shards")


def test_workers_give_identical_shards(array_cohort, tmp_path):
    one = small_build(array_cohort, tmp_path / "one")
    two = small_build(array_cohort, tmp_path / "two", workers=2)
    assert [s["sha256"] for s in one.shards] == [s["sha256"] for s in two.shards]


def test_s3_build_inspect_resume_and_stream(array_cohort, s3_bucket):
    url = f"{s3_bucket}/cohort/v1"
    m = small_build(array_cohort, url, workers=2)
    proc = run_cli("-m", "data_prep", "inspect", url)
    assert proc.returncode == 0 and "all" in proc.stdout and "checksums match" in proc.stdout
    samples = read_split(url, "train")  # WebDataset through the s3 gopen handler
    assert len(samples) == m.num_samples("train") > 0
    assert all(s.shape == (7, 20) and s.dtype == np.float16 for s, _ in samples)
    again = run_cli(
        "-m",
        "data_prep",
        "build",
        "--inputs",
        str(array_cohort),
        "--out",
        url,
        "--crop",
        "20",
        "--stride",
        "10",
        "--samples-per-shard",
        "4",
        "--tr",
        "0.8",
        "--quiet",
    )
    assert again.returncode == 0 and f"wrote 0, skipped {len(m.shards)}" in again.stdout


def test_manifest_round_trip_and_validation(array_cohort, tmp_path):
    m = small_build(array_cohort, tmp_path / "out")
    loaded = ShardSet.open(str(tmp_path / "out" / "manifest.json"))
    assert loaded.manifest == m and loaded.root == str(tmp_path / "out")
    bad = m.to_dict() | {"format_version": 99}
    with pytest.raises(ShardError, match="format_version 99"):
        Manifest.from_dict(bad)
    with pytest.raises(ShardError, match=r"no manifest\.json under"):
        ShardSet.open(str(tmp_path))


@pytest.mark.parametrize("command", ["synth", "build", "inspect", "push"])
def test_cli_help(command):
    proc = run_cli("-m", "data_prep", command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout
