"""The ViT-MAE BrainLM releases (vitmae_111M, vitmae_650M), imported and checked against transformers' own
ViTMAEForPreTraining with random weights, wrapped as the release wraps it (brainlm_mae/modeling_vit_mae_with_padding
.py: parcels sorted by Y, divided by max_val_to_scale, padded with -1 to a square, 3 identical channels; the
prediction cropped and averaged over the channels; the loss on the masked values inside the window). No download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainlm.exceptions import CheckpointError, InputError
from brainlm.model.convert_vitmae import CHECKED, convert_vitmae, key_map, model_config, release_tensor
from brainlm.model.vitmae import ImageMAE
from tests.conftest import build_tiny, run_cli

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

SCALE = 5.6430855  # the release tutorial's max_val_to_scale

# The releases' shapes (image, patch, encoder, decoder): what the 111M and 650M configs hold.
RELEASES = {
    "vitmae_111M": dict(image_size=432, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072),
    "vitmae_650M": dict(image_size=434, patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                        intermediate_size=5120),
}  # fmt: skip
DECODER = dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
               decoder_intermediate_size=2048)  # fmt: skip
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, decoder_hidden_size=16,
             decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=40)  # fmt: skip

# transformers 5's key names -> the release's (transformers 4, how the release was saved), spelled out here on their
# own so that the test does not borrow the importer's translation.
V4_NAMES = [
    ("vit.layers.", "vit.encoder.layer."),
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
]


def v4(key: str) -> str:
    for new, old in V4_NAMES:
        key = key.replace(new, old)
    return key


def reference(size: int, patch: int, **widths) -> ViTMAEForPreTraining:
    """transformers' ViTMAEForPreTraining with random weights (not zero: every tensor must be carried) and the image
    MAE's fixed 2-D sin-cos positions."""
    torch.manual_seed(0)
    ref = ViTMAEForPreTraining(ViTMAEConfig(image_size=size, patch_size=patch, mask_ratio=0.5, **widths)).eval()
    ref.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False  # transformers 5 skips it otherwise
    ref.vit.embeddings.initialize_weights()
    ref.decoder.initialize_weights((size // patch) ** 2)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return ref


def write_release(ref: ViTMAEForPreTraining, folder: Path, T: int = 200, names: str = "v4") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {**ref.config.to_dict(), "architectures": ["ViTMAEForPreTraining"], "num_timepoints_per_voxel": T}
    config["transformers_version"] = "4.28.0" if names == "v4" else transformers.__version__
    (folder / "config.json").write_text(json.dumps(config))
    state = {(v4(k) if names == "v4" else k): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    return folder


def release_forward(ref, x_BRT, order, mask_BL, scale=SCALE):
    """The release's forward (modeling_vit_mae_with_padding.ViTMAEForPreTraining.forward, auto_encode), the visible
    patches fed in index order: (latent_B1KD, prediction [B, R, T] in the release's units and sorted order, loss)."""
    S, p = ref.config.image_size, ref.config.patch_size
    _, R, T = x_BRT.shape
    img = x_BRT[:, order] / scale
    hh, wh = (S - R) // 2, (S - T) // 2
    pixels = F.pad(img, (wh, wh, hh, hh), "constant", -1)[:, None].repeat(1, 3, 1, 1)
    L = mask_BL.shape[1]
    noise = mask_BL.float() + torch.arange(L)[None] / (2.0 * L)  # kept first, each group in index order
    ref.config.mask_ratio = (float(mask_BL[0].sum()) - 0.5) / L  # len_keep = int(L * (1 - ratio)): ours
    out = ref.vit(pixels, noise=noise)
    logits = ref.decoder(out.last_hidden_state, out.ids_restore).logits
    pred = ref.unpatchify(logits)[:, :, hh:-hh, wh:-wh].mean(dim=1)
    m = ref.unpatchify(out.mask[:, :, None].repeat(1, 1, p * p * 3))[:, :, hh:-hh, wh:-wh].mean(dim=1)
    assert torch.equal(out.mask.bool(), mask_BL)
    loss = (((pred - img) ** 2) * m).sum() / m.sum()
    return out.last_hidden_state, pred, loss


def random_masks(B: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(L, generator=g)[: L // 2]] = True
    return mask


@pytest.mark.parametrize(
    ("R", "T", "S", "p", "names"),
    [(20, 24, 32, 4, "v4"), (20, 24, 32, 4, "v5"), (424, 200, 432, 16, "v4"), (424, 200, 434, 14, "v4")],
    ids=["small", "small-transformers5-names", "111M-geometry", "650M-geometry"],
)
def test_converted_model_matches_the_release(tmp_path, R, T, S, p, names):
    """Latent, reconstruction and loss equal the release's to 1e-5 with the mask fixed; embeddings (no mask) too. The
    image geometry is the releases' own in the last two cases (widths shrunk)."""
    ref = reference(S, p, **SMALL)
    coords = np.random.default_rng(0).uniform(-60, 60, (R, 3)).round(1)
    conv = convert_vitmae(write_release(ref, tmp_path / "release", T, names), coords)
    model = conv.model
    order = torch.from_numpy(np.argsort(coords[:, 1], kind="stable"))
    assert model.config.parcel_order == order.tolist()
    torch.manual_seed(2)
    x = torch.randn(2, R, T) * 2.0  # robust-scaled units
    mask = random_masks(2, (S // p) ** 2)
    with torch.no_grad():
        latent_ref, pred_ref, loss_ref = release_forward(ref, x, order, mask)
        latent, _, _ = model.forward_encoder(x, mask_BL=mask)
        out = model(x, mask_BL=mask)
        pred = model.unpatchify(out.pred_BLP, R)[:, order] / SCALE  # ours: atlas order, robust-scaled units
    assert torch.allclose(latent, latent_ref, atol=1e-5), (latent - latent_ref).abs().max()
    assert torch.allclose(pred, pred_ref, atol=1e-5), (pred - pred_ref).abs().max()
    assert abs(float(out.loss) - float(loss_ref)) < 1e-5
    # Embeddings: no mask, the patches in index order in both.
    hh, wh = (S - R) // 2, (S - T) // 2
    pixels = F.pad(x[:, order] / SCALE, (wh, wh, hh, hh), "constant", -1)[:, None].repeat(1, 3, 1, 1)
    ref.config.mask_ratio = 0.0
    with torch.no_grad():
        full = ref.vit(pixels, noise=torch.arange((S // p) ** 2).float().expand(2, -1)).last_hidden_state
        cls_BD, tokens_BLD = model.encode(x)
    assert torch.allclose(cls_BD, full[:, 0], atol=1e-5) and torch.allclose(tokens_BLD, full[:, 1:], atol=1e-5)
    # What the mask hides, in parcels and timepoints, is what the release's cropped mask says.
    m_ref = ref.unpatchify(mask.float()[:, :, None].repeat(1, 1, p * p * 3))[:, 0, hh:-hh, wh:-wh]
    assert np.array_equal(model.value_mask(mask, R)[:, order.numpy()], m_ref.bool().numpy())
    assert sorted(conv.dropped) == sorted(CHECKED)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_release_sizes_map_every_key(release):
    """At the releases' full sizes (on the meta device: no memory, no time), every key of transformers' model maps
    onto ours with the right shape, and the parameter count is the release's less the folded channels."""
    hf = {**RELEASES[release], **DECODER}
    with torch.device("meta"):
        ref = ViTMAEForPreTraining(ViTMAEConfig(**hf))
    state = {v4(k): v for k, v in ref.state_dict().items()}
    config = model_config({**hf, "model_type": "vit_mae"}, Path(release), list(range(424)), 200)
    mapping = key_map(config)
    used = {k for keys in mapping.values() for k in keys}
    assert used | set(CHECKED) == set(state), sorted(set(state) ^ (used | set(CHECKED)))
    ours = {k: release_tensor(k, [state[s] for s in sources], config) for k, sources in mapping.items()}
    with torch.device("meta"):
        model = ImageMAE(config)
    model.load_state_dict(ours, strict=True, assign=True)  # every shape checked
    D, E, p = config.hidden_size, config.decoder_hidden_size, config.patch_size
    folded = D * 2 * p * p + (E + 1) * 2 * p * p  # the patch weights of 2 of 3 channels, the head's 2 of 3
    fixed = (1 + config.num_tokens) * (D + E)  # the position tables
    assert model.num_params() == sum(t.numel() for t in ref.parameters()) - folded - fixed
    want = {"vitmae_111M": 111e6, "vitmae_650M": 650e6}[release]
    assert abs(model.num_params() - want) / want < 0.03, model.num_params()


def test_bad_releases_are_refused_with_the_reason(tmp_path):
    ref = reference(32, 4, **SMALL)
    folder = write_release(ref, tmp_path / "r", T=24)
    coords = np.random.default_rng(0).uniform(-60, 60, (20, 3))
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "vit.layernorm.bias"}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['vit.layernorm.bias'\]"):
        convert_vitmae(folder, coords)
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "norm_pix_loss": True}))
    with pytest.raises(CheckpointError, match="norm_pix_loss"):
        convert_vitmae(folder, coords)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="pad evenly"):  # 21 parcels cannot be centred in 32 rows
        convert_vitmae(folder, np.zeros((21, 3)))


@pytest.fixture(scope="module")
def vitmae_shards(tmp_path_factory) -> Path:
    """A synthetic A424-sized shard set (424 parcels, windows of 40 timepoints, for time): the 111M release's image
    (432 x 432 in patches of 16) holds it."""
    root = tmp_path_factory.mktemp("vitmae")
    build_tiny(root, 424, seed=5)
    return root / "shards"


def test_a_converted_release_runs_the_analyses(tmp_path, vitmae_shards):
    """import-brainlm on a ViT-MAE release (with its atlas table), then brainlm.load, embed and reconstruct (beside the
    baselines, masks in its own patches) from the command line."""
    import brainlm

    ref = reference(432, 16, **SMALL)  # the 111M release's geometry, widths shrunk
    release = write_release(ref, tmp_path / "vitmae_111M_small", T=40)
    table = vitmae_shards.parent / "cohort" / "atlas.tsv"
    missing = run_cli("-m", "brainlm.cli", "import-brainlm", str(release), "--out", str(tmp_path / "m0"))
    assert missing.returncode == 2 and "--atlas-table" in missing.stderr and "Traceback" not in missing.stderr
    model_dir = tmp_path / "model"
    proc = run_cli(
        "-m", "brainlm.cli", "import-brainlm", str(release), "--out", str(model_dir), "--atlas-table", str(table)
    )
    assert proc.returncode == 0, proc.stderr
    assert "ViTMAEForPreTraining" in proc.stdout and "432 x 432" in proc.stdout and "Y coordinate" in proc.stdout
    model = brainlm.load(model_dir, device="cpu")
    assert isinstance(model, ImageMAE) and model.extra["source"]["format"] == "ViTMAEForPreTraining"
    # A recording longer than the window: non-overlapping windows, their embeddings averaged (Brainmarks' protocol).
    rng = np.random.default_rng(0)
    rec = rng.standard_normal((130, 424)).astype(np.float32)
    with pytest.warns(UserWarning, match="no saved scaling"):
        per_window = model.embed(rec, average=False)
    assert per_window.shape == (3, SMALL["hidden_size"])
    with pytest.warns(UserWarning):
        assert np.allclose(model.embed(rec), per_window.mean(axis=0), atol=1e-6)
    with pytest.raises(InputError, match="latent_fc"), pytest.warns(UserWarning):
        model.embed(rec, pooling="latent_fc")

    # The registry's pyfunc loads it too (the folder says which model it holds).
    from types import SimpleNamespace

    from brainlm.tracking.pyfunc import BrainLMPyfunc

    pyfunc = BrainLMPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    windows = rng.standard_normal((3, 424, 40)).astype(np.float32)
    assert pyfunc.predict(None, windows, {"input": "windows"}).shape == (3, SMALL["hidden_size"])

    emb = run_cli(
        "-m", "brainlm.cli", "embed", "--model", str(model_dir), "--shards", str(vitmae_shards), "--out",
        str(tmp_path / "emb"),
    )  # fmt: skip
    assert emb.returncode == 0, emb.stderr
    out = tmp_path / "rec"
    rec_proc = run_cli(
        "-m", "brainlm.cli", "reconstruct", "--model", str(model_dir), "--shards", str(vitmae_shards), "--out",
        str(out), "--context", "0",
    )  # fmt: skip
    assert rec_proc.returncode == 0, rec_proc.stderr
    assert "no tube, parcel, future masking" in rec_proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["pooled_r2"]) == ["random"]
    r2 = metrics["pooled_r2"]["random"]
    assert {"model", "zero", "mean", "ridge", "spatiotemporal", "adaptive", "interp"} == set(r2)
    # Random weights reconstruct worse than predicting 0; the verdict says the model does not win.
    assert r2["model"] < r2["zero"] - 0.5, r2
    assert metrics["comparisons"]["random"]["model_vs_best"]["winner"] != "model"

    # A frozen probe and its random-weights control take it like any model; no latent-connectivity probe (its tokens
    # are not a parcel's).
    ft = run_cli(
        "-m", "brainlm.cli", "finetune", "--model", str(model_dir), "--shards", str(vitmae_shards), "--out",
        str(tmp_path / "ft"), "--target", "age", "--freeze", "--epochs", "2", "--seeds", "1",
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr
    table = json.loads((tmp_path / "ft" / "metrics.json").read_text())["table"]
    assert {"probe", "probe_random", "fc_ridge"} <= set(table) and "probe_latent_fc" not in table


def test_per_parcel_analyses_share_each_patch_among_its_parcels(tmp_path, vitmae_shards):
    """attention, networks, perturb and fingerprint run on a converted ViT-MAE (a model object, as from a notebook):
    per-parcel attention is each patch's weight shared by its parcels' values, so a layer's CLS row over the window's
    parcels sums to what it gives the window (at most 1)."""
    from brainlm.eval.attention import attention
    from brainlm.eval.fingerprint import fingerprint
    from brainlm.eval.networks import networks
    from brainlm.eval.perturb import PerturbConfig, perturb
    from brainlm.model import grid
    from brainlm.recordings.atlas import atlas_from_table

    ref = reference(432, 16, **SMALL)
    atlas = atlas_from_table(vitmae_shards.parent / "cohort" / "atlas.tsv")[0]
    model = convert_vitmae(write_release(ref, tmp_path / "release", T=40), atlas.coords()).model
    model.extra = {"atlas": {"labels": atlas.labels, "coords_mm": atlas.coords().tolist()}}
    x = torch.randn(2, 424, 40)
    with torch.no_grad():
        a_BYHL = model.cls_attention(x, include_cls=True)
        per_parcel = grid.parcel_attention(model, a_BYHL[..., 1:], 424)
        tokens = grid.parcel_tokens(model, model.encode(x)[1], 424)
    counts = model.token_parcel_counts()
    on_data = a_BYHL[..., 1:][..., counts.sum(dim=1) > 0].sum(dim=-1)  # what the patches holding values get
    assert torch.allclose(per_parcel.sum(dim=-1), on_data, atol=1e-5) and bool((on_data < 1).all())
    assert tokens.shape == (2, 424, SMALL["hidden_size"]) and torch.equal(counts.sum(dim=0), torch.full((424,), 40.0))
    att = attention(model, str(vitmae_shards), tmp_path / "att", group_by="condition")
    assert set(att["groups"]) == {"rest", "task"}
    moved = perturb(model, str(vitmae_shards), tmp_path / "perturb", PerturbConfig(steps=20))
    assert len(moved["magnitude"]) == 424 and moved["distance_after"] < moved["distance_before"]
    fp = fingerprint(model, str(vitmae_shards), tmp_path / "fp", split="train")
    assert {"cls", "mean", "cls_random", "fc"} <= set(fp["fingerprinting"]) and "latent_fc" not in fp["fingerprinting"]
    net = networks(model, str(vitmae_shards), tmp_path / "net", split="train", n_splits=2)
    assert {"attention", "tokens", "attention_random"} <= set(net["results"])
