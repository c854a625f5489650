"""Importing the released BrainLM weights, checked against a reference built from transformers' NystromformerLayer.

No weights are downloaded: the reference below is the released model's forward (brainlm_mae/modeling_brainlm.py:
embeddings, encoder, decoder, loss) written with the release's key names, with random weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from brainlm.exceptions import CheckpointError
from brainlm.model.convert import convert_brainlm
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
from transformers.models.nystromformer.configuration_nystromformer import NystromformerConfig  # noqa: E402
from transformers.models.nystromformer.modeling_nystromformer import NystromformerLayer  # noqa: E402


def hf_config(D=32, layers=2, heads=2, mlp=48, E=32, dec_layers=1, dec_heads=4, dec_mlp=40, R=20, T=60, P=20):
    return {
        "architectures": ["BrainLMForPretraining"],
        "model_type": "brainlm_mae",
        "hidden_size": D,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "decoder_hidden_size": E,
        "decoder_num_hidden_layers": dec_layers,
        "decoder_num_attention_heads": dec_heads,
        "decoder_intermediate_size": dec_mlp,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "num_brain_voxels": R,
        "num_timepoints_per_voxel": T,
        "timepoint_patching_size": P,
        "mask_ratio": 0.5,
        "num_landmarks": 64,
        "segment_means_seq_len": 64,
        "conv_kernel_size": 65,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "use_tanh_decoder": False,
        "loss_fn": "mse",
        "transformers_version": "4.28.0.dev0",
    }


def nystromformer(cfg: dict, width: int, heads: int, mlp: int) -> NystromformerLayer:
    return NystromformerLayer(
        NystromformerConfig(
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=mlp,
            hidden_act="gelu",
            layer_norm_eps=cfg["layer_norm_eps"],
            num_landmarks=cfg["num_landmarks"],
            segment_means_seq_len=cfg["segment_means_seq_len"],
            conv_kernel_size=cfg["conv_kernel_size"],
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


class PositionalEncoding(nn.Module):
    """The release's: interleaved sin / cos of the patch index, a persistent buffer."""

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        position = torch.arange(max_len).unsqueeze(1)
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):  # x [B, R, N, D]
        return x + self.pe[: x.size(2)][None, None]


class Reference(nn.Module):
    """BrainLMForPretraining's forward, key for key (vit.*, decoder.*)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        D, E, P = cfg["hidden_size"], cfg["decoder_hidden_size"], cfg["timepoint_patching_size"]
        eps = cfg["layer_norm_eps"]
        self.cfg = cfg
        self.vit = nn.Module()
        self.vit.embeddings = nn.Module()
        self.vit.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.vit.embeddings.signal_embedding_projection = nn.Linear(P, D)
        self.vit.embeddings.xyz_embedding_projection = nn.Linear(3, D)
        self.vit.embeddings.pos_embedding = PositionalEncoding(D)
        self.vit.encoder = nn.Module()
        self.vit.encoder.layer = nn.ModuleList(
            nystromformer(cfg, D, cfg["num_attention_heads"], cfg["intermediate_size"])
            for _ in range(cfg["num_hidden_layers"])
        )
        self.vit.layernorm = nn.LayerNorm(D, eps=eps)
        d = self.decoder = nn.Module()
        d.decoder_embed = nn.Linear(D, E)
        d.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        d.decoder_xyz_projection = nn.Linear(3, D)
        d.pos_embedding = PositionalEncoding(D)
        d.decoder_layers = nn.ModuleList(
            nystromformer(cfg, E, cfg["decoder_num_attention_heads"], cfg["decoder_intermediate_size"])
            for _ in range(cfg["decoder_num_hidden_layers"])
        )
        d.decoder_norm = nn.LayerNorm(E, eps=eps)
        d.decoder_pred1 = nn.Linear(E, E // 2)
        d.decoder_pred2 = nn.Linear(E // 2, P)
        d.decoder_pred = nn.Linear(E, P)  # ViTMAEDecoder's own head: in the state dict, unused

    def forward(self, signal_BRT, xyz_R3, noise_BL, mask_ratio):
        emb, d = self.vit.embeddings, self.decoder
        B, R, T = signal_BRT.shape
        P = self.cfg["timepoint_patching_size"]
        N = T // P
        x = emb.signal_embedding_projection(signal_BRT.reshape(B, R, N, P))
        x = x + emb.xyz_embedding_projection(xyz_R3)[None, :, None, :]
        x = emb.pos_embedding(x).flatten(1, 2)
        L = R * N
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise_BL, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, x.shape[-1]))
        mask = torch.ones(B, L)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        h = torch.cat([emb.cls_token.expand(B, -1, -1), kept], dim=1)
        for layer in self.vit.encoder.layer:
            h = layer(h)[0]
        latent = self.vit.layernorm(h)

        y = d.decoder_embed(latent)
        E = y.shape[-1]
        y_ = torch.cat([y[:, 1:], d.mask_token.repeat(B, L - len_keep, 1)], dim=1)
        y_ = torch.gather(y_, 1, ids_restore[:, :, None].repeat(1, 1, E)).reshape(B, R, N, E)
        y_ = y_ + d.decoder_xyz_projection(xyz_R3)[None, :, None, :]
        y_ = d.pos_embedding(y_).flatten(1, 2)
        h = torch.cat([y[:, :1], y_], dim=1)
        for layer in d.decoder_layers:
            h = layer(h)[0]
        logits = d.decoder_pred2(nn.functional.leaky_relu(d.decoder_pred1(d.decoder_norm(h)), 0.1))[:, 1:]
        target = signal_BRT.reshape(B, L, P)
        m = mask[:, :, None].expand(-1, -1, P)
        loss = ((logits - target) ** 2 * m).sum() / m.sum()
        return latent, logits, mask.bool(), loss


def random_reference(cfg: dict, seed: int = 0) -> Reference:
    torch.manual_seed(seed)
    ref = Reference(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or "layernorm" in name or "decoder_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5) + 0.01 * torch.randn_like(p))
    return ref.eval()


def write_release(ref: Reference, folder: Path, fmt: str = "safetensors") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(ref.cfg))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_converted_model_matches_the_reference(tmp_path, fmt):
    cfg = hf_config()
    ref = random_reference(cfg)
    conv = convert_brainlm(write_release(ref, tmp_path / "release", fmt))
    ours = conv.model
    B, R, T, N = 3, 20, 60, 3
    torch.manual_seed(1)
    signal = torch.randn(B, R, T)
    xyz = torch.randn(R, 3) * 40  # MNI mm
    mask_BL = torch.zeros(B, R * N, dtype=torch.bool)
    for b in range(B):
        mask_BL[b, torch.randperm(R * N)[: R * N // 2]] = True
    # The reference's order of the visible tokens, defined as ours: kept tokens first, each group in index order.
    noise = mask_BL.float() + torch.arange(R * N)[None] / (10.0 * R * N)
    with torch.no_grad():
        latent_ref, logits_ref, mask_ref, loss_ref = ref(signal, xyz, noise, 0.5)
        latent, _, _ = ours.forward_encoder(signal, xyz, mask_BL=mask_BL)
        out = ours(signal, xyz, mask_BL=mask_BL)
    assert torch.equal(mask_ref, mask_BL)
    assert torch.allclose(latent, latent_ref, atol=1e-5), (latent - latent_ref).abs().max()
    assert torch.allclose(out.pred_BLP, logits_ref, atol=1e-5), (out.pred_BLP - logits_ref).abs().max()
    assert abs(float(out.loss) - float(loss_ref)) < 1e-5
    # Embeddings: no masking, identity order in both.
    with torch.no_grad():
        full_ref, *_ = ref(signal, xyz, torch.arange(R * N).float().expand(B, -1), 0.0)
        cls_BD, tokens_BLD = ours.encode(signal, xyz)
    assert torch.allclose(cls_BD, full_ref[:, 0], atol=1e-5) and torch.allclose(tokens_BLD, full_ref[:, 1:], atol=1e-5)
    assert sorted(conv.dropped) == [
        "decoder.decoder_pred.bias",
        "decoder.decoder_pred.weight",
        "decoder.pos_embedding.pe",
        "vit.embeddings.pos_embedding.pe",
    ]


def test_paper_sizes_convert_with_every_key_accounted_for(tmp_path):
    cfg = hf_config(D=512, layers=4, heads=4, mlp=1024, E=512, dec_layers=2, dec_heads=4, dec_mlp=1024, R=424, T=200)
    ref = random_reference(cfg)
    conv = convert_brainlm(write_release(ref, tmp_path / "old_13M"))
    unused = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("decoder.decoder_pred."))
    assert conv.model.num_params() == sum(p.numel() for p in ref.parameters()) - unused
    assert 12e6 < conv.model.num_params() < 14e6  # "13M"
    c = conv.model.config
    assert (c.block_norm, c.value_conv_kernel, c.temporal_layout, c.decoder_head) == ("post", 65, "interleaved", "mlp")
    assert (c.num_parcels, c.num_timepoints, c.patch_size) == (424, 200, 20)


def test_bad_releases_get_errors_that_name_the_key(tmp_path):
    cfg = hf_config()
    ref = random_reference(cfg)
    folder = write_release(ref, tmp_path / "r")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "vit.layernorm.weight"}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['vit.layernorm.weight'\]"):
        convert_brainlm(folder)
    save_file({**state, "vit.pooler.dense.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['vit.pooler.dense.weight'\]"):
        convert_brainlm(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "segment_means_seq_len": 128}))
    with pytest.raises(CheckpointError, match="Nystrom approximation"):
        convert_brainlm(folder)


def test_import_cli_writes_a_model_folder_with_its_atlas(tmp_path):
    from brainlm.model import BrainLM

    ref = random_reference(hf_config())
    release = write_release(ref, tmp_path / "release")
    table = tmp_path / "atlas.tsv"
    table.write_text("name\tx\ty\tz\n" + "".join(f"p{i}\t{i}\t{-i}\t{2 * i}\n" for i in range(20)))
    proc = run_cli(
        "-m", "brainlm.cli", "import-brainlm", str(release), "--out", str(tmp_path / "m"), "--atlas-table", str(table)
    )
    assert proc.returncode == 0, proc.stderr
    assert "normalisation" in proc.stdout and "decoder.decoder_pred.weight" in proc.stdout
    model = BrainLM.from_pretrained(tmp_path / "m")
    assert (
        model.extra["atlas"]["labels"][:2] == ["p0", "p1"]
        and model.extra["source"]["format"] == "BrainLMForPretraining"
    )
    assert model.scaling is None  # not recorded in the release
    bad = run_cli("-m", "brainlm.cli", "import-brainlm", str(tmp_path / "nope"), "--out", str(tmp_path / "m2"))
    assert bad.returncode == 2 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
