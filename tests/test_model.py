"""Contract tests of brainlm.model on tiny CPU configs with all-distinct sizes.

B=3 samples, R=7 parcels, T=24 timepoints, P=4 per patch (N=6 patches, L=42 tokens), encoder D=32 with
H=2 heads, decoder 16 wide: a transposed axis changes a shape and fails loudly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from brainlm.exceptions import CheckpointError, ConfigError, DimensionError, InputError
from brainlm.masking import MASKINGS
from brainlm.model import (
    PRESETS,
    BrainLM,
    BrainLMForPrediction,
    MAEOutput,
    MLPHead,
    ModelConfig,
    attention,
    get_preset,
)

B, R, T, P = 3, 7, 24, 4
N, L = T // P, R * T // P
D = 32

TINY = dict(
    num_parcels=R,
    num_timepoints=T,
    patch_size=P,
    hidden_size=D,
    num_layers=2,
    num_heads=2,
    intermediate_size=40,
    decoder_hidden_size=16,
    decoder_num_layers=2,
    decoder_num_heads=2,
    decoder_intermediate_size=24,
)
CUDA = torch.cuda.is_available()
XFORMERS = importlib.util.find_spec("xformers") is not None


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def build(seed: int = 0, **overrides) -> BrainLM:
    torch.manual_seed(seed)
    return BrainLM(tiny(**overrides))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    signal_BRT = torch.randn(B, R, T, generator=g)
    coords_R3 = torch.randn(R, 3, generator=g) * 40  # MNI mm
    return signal_BRT, coords_R3


# ---------------------------------------------------------------- shapes, gradients, masking


def test_forward_shapes_and_finite(batch):
    out = build()(*batch)
    assert isinstance(out, MAEOutput)
    loss, pred_BLP, mask_BL = out  # unpacks like MAE's tuple
    assert loss.shape == () and torch.isfinite(loss)
    assert pred_BLP.shape == (B, L, P) and torch.isfinite(pred_BLP).all()
    assert mask_BL.shape == (B, L) and mask_BL.dtype == torch.bool


@pytest.mark.parametrize(
    "overrides",
    [{}, {"spatial_encoding": "fourier", "learned_parcel_embedding": True, "norm_target": True}],
    ids=["linear", "fourier+table+norm_target"],
)
def test_every_parameter_gets_a_gradient(batch, overrides):
    model = build(**overrides)
    model(*batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero


def test_kept_count_and_ids_restore_inverts_the_shuffle(batch):
    model = build()
    ratio = 0.75
    K = int(L * (1 - ratio))
    # Token l carries the value l, so kept tokens name their original positions.
    tokens_BLD = torch.arange(L, dtype=torch.float32)[None, :, None].expand(B, L, 2).clone()
    kept_BKD, mask_BL, ids_restore_BL = model.random_masking(tokens_BLD, ratio, R)
    assert kept_BKD.shape == (B, K, 2)
    assert (mask_BL.sum(1) == L - K).all()
    # Kept tokens are the unmasked ones, in their original order.
    for b in range(B):
        assert torch.equal(kept_BKD[b, :, 0], torch.nonzero(~mask_BL[b]).flatten().float())
    # Re-filling removed slots with -1 and unshuffling restores every kept token to its place.
    full_BL = torch.cat([kept_BKD[..., 0], -torch.ones(B, L - K)], dim=1)
    restored_BL = torch.gather(full_BL, 1, ids_restore_BL)
    expected_BL = torch.where(mask_BL, -1.0, torch.arange(L, dtype=torch.float32))
    assert torch.equal(restored_BL, expected_BL)
    latent_B1KD, _, _ = model.forward_encoder(*batch, mask_ratio=ratio)
    assert latent_B1KD.shape == (B, 1 + K, D)


def test_random_masking_on_empty_width_tokens_and_generator_reproducible():
    model = build()
    masks = [
        model.random_masking(torch.empty(1, L, 0), 0.5, R, generator=torch.Generator().manual_seed(3))[1]
        for _ in range(2)
    ]
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == L - int(L * 0.5)


def test_masking_strategies_mask_what_they_say():
    model = build()
    tokens_BLD = torch.randn(B, L, 5)
    ratio = 0.5
    for masking in MASKINGS:
        kept_BKD, mask_BL, _ = model.random_masking(tokens_BLD, ratio, R, masking=masking)
        mask_BRN = mask_BL.view(B, R, N)
        if masking == "random":
            assert (mask_BL.sum(1) == L - int(L * (1 - ratio))).all()
        elif masking == "tube":  # the same patch indices in every parcel
            assert (mask_BRN == mask_BRN[:, :1]).all()
            assert (mask_BRN[:, 0].sum(1) == N - int(N * (1 - ratio))).all()
        elif masking == "parcel":  # whole parcels
            assert (mask_BRN == mask_BRN[:, :, :1]).all()
            assert (mask_BRN[:, :, 0].sum(1) == R - int(R * (1 - ratio))).all()
        else:  # future: the last patches of every parcel
            expected_N = torch.arange(N) >= int(N * (1 - ratio))
            assert (mask_BRN == expected_N).all()
        assert kept_BKD.shape[1] == L - int(mask_BL[0].sum())
    # Tube masks differ between samples (random per sample), parcel masks too.
    _, mask_BL, _ = model.random_masking(torch.randn(64, L, 1), ratio, R, masking="tube")
    assert not (mask_BL == mask_BL[:1]).all()


def test_masking_that_keeps_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"`model.mask_ratio` 0.9 .* keeps 0 of 6"):
        build().random_masking(torch.randn(B, L, 2), 0.9, R, masking="future")


def test_explicit_mask_is_honoured(batch):
    model = build()
    g = torch.Generator().manual_seed(5)
    mask_BL = torch.stack([torch.randperm(L, generator=g) < 30 for _ in range(B)])
    latent_B1KD, out_mask_BL, _ = model.forward_encoder(*batch, mask_BL=mask_BL.int())
    assert torch.equal(out_mask_BL, mask_BL) and latent_B1KD.shape == (B, 1 + L - 30, D)
    # Deterministic: the same mask gives the same loss; a 1-D mask applies to every sample.
    assert torch.equal(model(*batch, mask_BL=mask_BL).loss, model(*batch, mask_BL=mask_BL).loss)
    assert torch.equal(model(*batch, mask_BL=mask_BL[0]).mask_BL, mask_BL[:1].expand(B, L))
    uneven = mask_BL.clone()
    uneven[0, ~mask_BL[0]] = True
    with pytest.raises(InputError, match="same number of tokens"):
        model(*batch, mask_BL=uneven)
    with pytest.raises(DimensionError, match=r"mask_BL must be \[3, 42\]"):
        model(*batch, mask_BL=mask_BL[:, :-1])


def test_loss_counts_masked_tokens_only(batch):
    model = build()
    signal_BRT, coords_R3 = batch
    out = model(signal_BRT, coords_R3)
    pred_BLP = out.pred_BLP.detach()
    visible = pred_BLP.clone()
    visible[~out.mask_BL] += 10.0
    masked = pred_BLP.clone()
    masked[out.mask_BL] += 10.0
    loss = model.forward_loss(signal_BRT, pred_BLP, out.mask_BL)
    assert torch.allclose(loss, out.loss)
    assert torch.equal(model.forward_loss(signal_BRT, visible, out.mask_BL), loss)
    assert model.forward_loss(signal_BRT, masked, out.mask_BL) > loss + 1
    # The hand-computed masked MSE.
    target_BLP = model.patchify(signal_BRT)
    expected = ((pred_BLP - target_BLP) ** 2).mean(-1)[out.mask_BL].mean()
    assert torch.allclose(loss, expected)


def test_patchify_is_parcel_major_and_unpatchify_inverts_it(batch):
    model = build()
    signal_BRT = batch[0]
    patches_BLP = model.patchify(signal_BRT)
    assert patches_BLP.shape == (B, L, P)
    for r, n in [(0, 0), (0, N - 1), (1, 0), (R - 1, 2)]:
        assert torch.equal(patches_BLP[:, r * N + n], signal_BRT[:, r, n * P : (n + 1) * P])
    assert torch.equal(model.unpatchify(patches_BLP, R), signal_BRT)


def test_input_shape_errors_name_the_sizes(batch):
    model = build()
    signal_BRT, coords_R3 = batch
    with pytest.raises(DimensionError, match=r"coordinates must be \[parcels, 3\] = \[7, 3\]"):
        model(signal_BRT, coords_R3[:-1])
    with pytest.raises(DimensionError, match=r"23 timepoints are not a multiple of `model.patch_size` \(4\)"):
        model(signal_BRT[..., :-1], coords_R3)
    with pytest.raises(DimensionError, match="learned parcel table"):
        build(learned_parcel_embedding=True)(signal_BRT[:, :-1], coords_R3[:-1])


def test_any_parcel_count_and_window_length(batch):
    """Without the learned table, the coordinates decide R and any T divisible by P works."""
    model = build().eval()
    coords_R3 = batch[1]
    out = model(torch.randn(2, 5, 16), coords_R3[:5])
    assert out.pred_BLP.shape == (2, 5 * 4, P)
    cls_BD, tokens_BLD = model.encode(torch.randn(2, 5, 16), coords_R3[:5])
    assert cls_BD.shape == (2, D) and tokens_BLD.shape == (2, 20, D)


# ---------------------------------------------------------------- encode and attention


def test_encode_is_deterministic_and_independent_of_the_batch(batch):
    model = build().eval()
    signal_BRT, coords_R3 = batch
    cls_BD, tokens_BLD = model.encode(signal_BRT, coords_R3)
    assert cls_BD.shape == (B, D) and tokens_BLD.shape == (B, L, D)
    again = model.encode(signal_BRT, coords_R3)
    assert torch.equal(cls_BD, again[0]) and torch.equal(tokens_BLD, again[1])
    alone_cls, alone_tokens = model.encode(signal_BRT[1:2], coords_R3)
    torch.testing.assert_close(alone_cls[0], cls_BD[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone_tokens[0], tokens_BLD[1], rtol=1e-5, atol=1e-5)


def test_sdpa_and_math_backends_agree(batch):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, 2, 11, 8, generator=g) for _ in range(3))
    out_math, weights = attention(q, k, v, backend="math", need_weights=True)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), out_math, rtol=1e-5, atol=1e-5)
    assert weights.shape == (B, 2, 11, 11)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 2, 11))
    # The whole model, same weights, both backends.
    sdpa, math = build(), build(attention_backend="math")
    math.load_state_dict(sdpa.state_dict())
    mask_BL = sdpa(*batch).mask_BL
    torch.testing.assert_close(sdpa(*batch, mask_BL=mask_BL).loss, math(*batch, mask_BL=mask_BL).loss)


def test_weights_need_the_math_backend():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="backend='math'"):
        attention(q, q, q, backend="sdpa", need_weights=True)


def test_xformers_off_cuda_is_a_clear_error():
    q = torch.randn(1, 2, 3, 4)  # CPU tensors: an error whether or not xformers is installed
    with pytest.raises(ConfigError, match=r"'xformers' .*(CUDA|not installed).*attention_backend=sdpa"):
        attention(q, q, q, backend="xformers")


@pytest.mark.skipif(not (CUDA and XFORMERS), reason="xformers needs a CUDA GPU and the xformers package")
def test_xformers_agrees_with_math_fp32():
    q, k, v = (torch.randn(B, 2, 11, 8, device="cuda") for _ in range(3))
    torch.testing.assert_close(
        attention(q, k, v, backend="xformers"), attention(q, k, v, backend="math"), rtol=1e-4, atol=1e-4
    )


def slow_cls_rows(model: BrainLM, signal_BRT: torch.Tensor, coords_R3: torch.Tensor) -> torch.Tensor:
    """The CLS row of the full L x L math attention of every layer, the slow way: [B, Y, H, 1 + L]."""
    x = torch.cat([model.cls_token.expand(B, -1, -1), model._embed(signal_BRT, coords_R3)], dim=1)
    rows = []
    for block in model.blocks:
        h = block.norm1(x)
        H = block.attn.num_heads
        q, k, v = block.attn.qkv(h).view(B, 1 + L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        _, weights_BHLL = attention(q, k, v, backend="math", need_weights=True)
        rows.append(weights_BHLL[:, :, 0])
        x = block(x)
    return torch.stack(rows, dim=1)


def test_cls_attention_is_the_cls_row_of_full_attention(batch):
    model = build().eval()
    with torch.no_grad():
        full_BYHS = model.cls_attention(*batch, include_cls=True)
        attn_BYHL = model.cls_attention(*batch)
        expected = slow_cls_rows(model, *batch)
    assert full_BYHS.shape == (B, 2, 2, 1 + L) and attn_BYHL.shape == (B, 2, 2, L)
    torch.testing.assert_close(full_BYHS.sum(-1), torch.ones(B, 2, 2))
    torch.testing.assert_close(full_BYHS, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(attn_BYHL, full_BYHS[..., 1:])  # CLS column dropped, not renormalised
    with torch.no_grad():
        same, tokens_BLD = model.cls_attention(*batch, return_tokens=True)
        torch.testing.assert_close(tokens_BLD, model.encode(*batch)[1])  # the tokens encode returns, one pass
    assert torch.equal(same, attn_BYHL)


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_their_names(name):
    with torch.device("meta"):  # no memory for 650m / 1b
        model = BrainLM(get_preset(name))
    nominal = {"debug": 28e3, "13m": 13e6, "111m": 111e6, "650m": 650e6, "1b": 1e9}[name]
    assert abs(model.num_params() / nominal - 1) < 0.1, model.num_params()
    assert model.num_params(trainable_only=True) == model.num_params()


@pytest.mark.parametrize("spatial_encoding", ["linear", "fourier"])
def test_flops_per_sample_matches_the_flop_counter(spatial_encoding):
    model = build(attention_backend="math", spatial_encoding=spatial_encoding)
    signal_BRT, coords_R3 = torch.randn(1, R, T), torch.randn(R, 3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(signal_BRT, coords_R3, mask_ratio=0.5)
    assert counter.get_total_flops() == model.flops_per_sample(mask_ratio=0.5) / 3


def test_flops_per_sample_by_hand():
    model = build()
    K, S, S_dec = int(L * 0.25), 1 + int(L * 0.25), 1 + L

    def block(S: int, dim: int, mlp: int) -> int:
        return 2 * S * (3 * dim * dim + dim * dim + 2 * dim * mlp) + 4 * S * S * dim

    forward = (
        2 * L * P * D
        + 2 * R * 3 * D
        + 2 * block(S, D, 40)
        + 2 * S * D * 16
        + 2 * R * 3 * 16
        + 2 * block(S_dec, 16, 24)
        + 2 * S_dec * 16 * P
    )
    assert K == 10 and model.flops_per_sample() == 3 * forward
    assert model.flops_per_sample(num_parcels=2 * R) > model.flops_per_sample()


def test_param_groups_cover_every_parameter_once():
    model = build(learned_parcel_embedding=True, spatial_encoding="fourier")
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for name in ("cls_token", "mask_token", "parcel_embed", "decoder_parcel_embed", "norm.weight"):
        assert name in no_decay_names
    assert all(n.endswith("bias") or "norm" in n or "embed" in n or "token" in n for n in no_decay_names)
    assert "blocks.0.attn.qkv.weight" in decay_names and "patch_embed.weight" in decay_names
    assert not any("spatial" in n or n.endswith("bias") for n in decay_names)


# ---------------------------------------------------------------- files


def test_save_load_round_trip(batch, tmp_path):
    model = build(spatial_encoding="fourier", learned_parcel_embedding=True).eval()
    scaling = {"median": [0.1] * R, "iqr": [1.5] * R}
    model.save_pretrained(tmp_path / "m", scaling=scaling, extra={"steps": 3})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "extra.json",
        "model.safetensors",
        "scaling.json",
    ]
    # Every file with the permissions a plain open() gives: safetensors recreates its file 0600, unreadable to others.
    from brainlm.atomic import _umask

    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044 == 0o044 & ~_umask(), modes
    loaded = BrainLM.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert loaded.scaling == scaling and loaded.extra == {"steps": 3}
    mask_BL = model(*batch).mask_BL
    assert torch.equal(loaded(*batch, mask_BL=mask_BL).pred_BLP, model(*batch, mask_BL=mask_BL).pred_BLP)
    assert torch.equal(loaded.encode(*batch)[0], model.encode(*batch)[0])
    # Saving again without scaling removes the stale file.
    model.save_pretrained(tmp_path / "m")
    assert BrainLM.from_pretrained(tmp_path / "m").scaling is None


def test_load_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        BrainLM.from_pretrained(tmp_path)
    build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 16, "intermediate_size": 8}))
    with pytest.raises(CheckpointError, match="does not match the model"):
        BrainLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors not found"):
        BrainLM.from_pretrained(tmp_path)


def _counting(forward, calls: list[int]):
    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return counted


@pytest.mark.parametrize("decoder_attention", ["joint", "factorized"])
def test_activation_checkpointing_leaves_outputs_and_gradients_unchanged(batch, decoder_attention):
    from brainlm.training.pretrain import apply_activation_checkpointing

    plain, ckpt = (
        build(dropout=0.1, decoder_attention=decoder_attention),
        build(dropout=0.1, decoder_attention=decoder_attention),
    )
    apply_activation_checkpointing(ckpt)  # a training choice, not a model field
    ckpt.load_state_dict(plain.state_dict())
    results, calls = [], []
    for model in (plain, ckpt):
        out = model(*batch, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)  # the same dropout draws: checkpointing replays the RNG state
        counted: list[int] = []
        for block in [*model.blocks, *model.decoder_blocks]:
            block._forward = _counting(block._forward, counted)
        out = model(*batch, mask_BL=out.mask_BL)
        out.loss.backward()
        calls.append(len(counted))
        results.append((out.pred_BLP, {n: p.grad for n, p in model.named_parameters()}))
    blocks = len(plain.blocks) + len(plain.decoder_blocks)
    assert calls == [blocks, 2 * blocks], calls  # every block, the factorized decoder's too, recomputed in backward
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"hidden_size": 33}, r"`model.hidden_size` \(33\) must be divisible by `model.num_heads` \(2\)"),
        ({"decoder_num_heads": 3}, r"`model.decoder_hidden_size` \(16\) must be divisible"),
        ({"num_timepoints": 25}, r"`model.num_timepoints` \(25\) must be divisible by `model.patch_size` \(4\)"),
        ({"mask_ratio": 1.0}, r"`model.mask_ratio` must be in \(0, 1\)"),
        ({"mask_ratio": 0.0}, r"`model.mask_ratio`"),
        ({"masking": "block"}, r"`model.masking` must be one of random, tube, parcel, future"),
        ({"spatial_encoding": "learned"}, r"`model.spatial_encoding` must be one of linear, fourier"),
        ({"attention_backend": "flash"}, r"`model.attention_backend` must be one of sdpa, xformers, math"),
        ({"num_layers": 0}, r"`model.num_layers` must be a positive integer"),
        ({"patch_size": 2.5}, r"`model.patch_size` must be a positive integer"),
        ({"dropout": 1.0}, r"`model.dropout`"),
        ({"norm_target": "yes"}, r"`model.norm_target` must be true or false, got 'yes'"),
        ({"mask_ratio": "0.5"}, r"`model.mask_ratio` must be a number"),
        ({"intermediate_size": -1}, r"`model.intermediate_size` must be a positive integer, got -1"),
        ({"time_unit_s": -0.72}, r"`model.time_unit_s` must be 0 \(one TR\) or a TR in seconds"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**overrides)


def test_a_tr_aware_model_reads_the_tr_and_a_plain_one_ignores_it(batch):
    """model.time_unit_s: a patch's temporal position is its start time in patches of time_unit_s, plus a learned
    per-width offset scaled by log(TR / time_unit_s). At its own unit (or with no TR) it is the plain model with the
    same weights; another TR moves every token; a plain model takes no notice of a TR."""
    signal_BRT, coords_R3 = batch
    mask_BL = build().masks_from_seeds(list(range(B)), R, 0.5, "random")
    plain = build(seed=3).eval()
    aware = build(seed=3, time_unit_s=0.72).eval()
    aware.load_state_dict(plain.state_dict(), strict=False)  # the same weights; the TR offsets start at 0
    assert {n for n, _ in aware.named_parameters()} - {n for n, _ in plain.named_parameters()} == {
        "tr_embed",
        "decoder_tr_embed",
    }
    with torch.no_grad():
        aware.tr_embed.normal_(), aware.decoder_tr_embed.normal_()
        ref = plain(signal_BRT, coords_R3, mask_BL=mask_BL).pred_BLP
        assert torch.equal(plain(signal_BRT, coords_R3, mask_BL=mask_BL, tr=2.0).pred_BLP, ref)
        for tr in (None, 0.72):
            torch.testing.assert_close(aware(signal_BRT, coords_R3, mask_BL=mask_BL, tr=tr).pred_BLP, ref)
            torch.testing.assert_close(
                aware.encode(signal_BRT, coords_R3, tr=tr)[0], plain.encode(signal_BRT, coords_R3)[0]
            )
        slow = aware(signal_BRT, coords_R3, mask_BL=mask_BL, tr=2.0).pred_BLP
        assert (slow - ref).abs().max() > 1e-3
        aware.tr_embed.zero_(), aware.decoder_tr_embed.zero_()  # positions alone: time, not patch index
        assert (aware(signal_BRT, coords_R3, mask_BL=mask_BL, tr=2.0).pred_BLP - ref).abs().max() > 1e-3
    with pytest.raises(InputError, match="tr must be a positive number of seconds"):
        aware(signal_BRT, coords_R3, tr=0.0)


def test_config_dict_round_trip_and_unknown_keys():
    config = tiny(masking="tube")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match=r"Unknown config key\(s\) `model.hiden_size`"):
        ModelConfig.from_dict({**config.to_dict(), "hiden_size": 3})
    assert config.num_patches == N and config.mlp_dim == 40 and config.head_dim == 16
    assert ModelConfig().mlp_dim == 2048 and ModelConfig().decoder_mlp_dim == 2048


def test_get_preset_overrides_and_errors():
    config = get_preset("13m", masking="future")
    assert (config.hidden_size, config.mlp_dim, config.masking) == (512, 1024, "future")
    with pytest.raises(ConfigError, match=r"Unknown model preset '13M'; valid presets: debug, 13m, 111m"):
        get_preset("13M")
    with pytest.raises(ConfigError, match=r"`model.hidden`"):
        get_preset("debug", hidden=3)
    assert dataclasses.replace(get_preset("debug"), num_parcels=R).num_parcels == R


def test_debug_preset_trains_on_any_shape():
    model = BrainLM(get_preset("debug"))
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-2)
    signal_BRT, coords_R3 = torch.randn(4, 9, 40), torch.randn(9, 3) * 50
    losses = []
    for _ in range(5):
        loss = model(signal_BRT, coords_R3, mask_BL=torch.arange(9 * 2) % 3 > 0).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prediction_head_shapes_and_gradients(batch, pooling):
    model = BrainLMForPrediction(build(), out_dim=5, pooling=pooling, hidden_dim=12)
    out_BO = model(*batch)
    assert out_BO.shape == (B, 5)
    out_BO.sum().backward()
    assert model.backbone.cls_token.grad is not None or pooling == "mean"
    assert model.backbone.patch_embed.weight.grad is not None
    assert isinstance(model.head, MLPHead)


def test_frozen_backbone_gets_no_gradient(batch):
    model = BrainLMForPrediction(build(), out_dim=2, freeze_backbone=True).train()
    assert not model.backbone.training and model.head.training
    model(*batch).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    groups = model.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.head.parameters()))


def test_prediction_model_save_load_round_trip(batch, tmp_path):
    model = BrainLMForPrediction(build(), out_dim=3, pooling="mean", num_layers=3, dropout=0.2).eval()
    model.save_pretrained(tmp_path, scaling={"median": [0.0]})
    loaded = BrainLMForPrediction.from_pretrained(tmp_path)
    assert torch.equal(loaded(*batch), model(*batch))
    assert loaded.head_config == model.head_config and loaded.backbone.scaling == {"median": [0.0]}
    # The folder is also a pretrained BrainLM folder.
    assert torch.equal(BrainLM.from_pretrained(tmp_path).encode(*batch)[0], model.backbone.encode(*batch)[0])
    (tmp_path / "head.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"head\.json not found"):
        BrainLMForPrediction.from_pretrained(tmp_path)


def test_head_errors():
    with pytest.raises(ConfigError, match=r"`head\.pooling`"):
        BrainLMForPrediction(build(), out_dim=1, pooling="max")
    with pytest.raises(ConfigError, match=r"`head\.num_layers`"):
        MLPHead(4, 1, num_layers=0)


# ---------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_backends_agree_in_bf16():
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = attention(q.float(), k.float(), v.float(), backend="math")
    backends = ["sdpa", "math"] + (["xformers"] if XFORMERS else [])
    for backend in backends:
        out = attention(q, k, v, backend=backend)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2, msg=backend)


@pytest.mark.gpu
@gpu
def test_gpu_model_backends_agree_in_bf16(batch):
    signal_BRT, coords_R3 = (t.cuda() for t in batch)
    backends = ["sdpa", "math"] + (["xformers"] if XFORMERS else [])
    models = [build(attention_backend=b).cuda().eval() for b in backends]
    mask_BL = models[0](signal_BRT, coords_R3).mask_BL
    with torch.autocast("cuda", dtype=torch.bfloat16):
        preds = [m(signal_BRT, coords_R3, mask_BL=mask_BL).pred_BLP.float() for m in models]
    for backend, pred in zip(backends, preds, strict=True):
        torch.testing.assert_close(pred, preds[-1 if backend == "sdpa" else 0], rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@gpu
def test_gpu_encode_is_deterministic(batch):
    model = build().cuda().eval()
    signal_BRT, coords_R3 = (t.cuda() for t in batch)
    first, second = model.encode(signal_BRT, coords_R3), model.encode(signal_BRT, coords_R3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@gpu
def test_gpu_saved_model_loads_on_cpu(batch, tmp_path):
    model = build().cuda().eval()
    model.save_pretrained(tmp_path)
    loaded = BrainLM.from_pretrained(tmp_path, map_location="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    cpu_model = build().eval()  # same seed, same weights, built on CPU
    torch.testing.assert_close(loaded.encode(*batch)[0], cpu_model.encode(*batch)[0])
    on_gpu = BrainLM.from_pretrained(tmp_path, map_location="cuda")
    assert next(on_gpu.parameters()).is_cuda


# ---------------------------------------------------------------- the decoder's Gaussian prior


def test_gaussian_prior_starts_at_the_prior_and_learns_a_correction(batch, tmp_path):
    """With a zero correction a model with `decoder_prior: gaussian` predicts the prior exactly; the prior's
    statistics travel with the weights; another atlas falls back to the window's own covariance."""
    from brainlm.model import prior

    signal, coords = batch
    model = build(decoder_prior="gaussian", prior_ridge=0.05, prior_shrinkage=0.5)
    with torch.no_grad():
        model.decoder_pred.weight.zero_()  # a zero correction (the default init is MAE's, as the head learns faster)
    train = torch.randn(40, R, T) @ torch.randn(T, T) * 0.1 + torch.randn(R)[None, :, None]
    model.fit_prior(train, coords)
    mu, cov = prior.fit(train)
    out = model(signal, coords)
    mask_BRN = out.mask_BL.reshape(B, R, N)
    expected = model.patchify(prior.impute(signal, mask_BRN, mu, cov, P, 0.05, 0.5))
    assert torch.allclose(out.pred_BLP, expected, atol=1e-6)
    other = model(signal, coords + 5.0, mask_BL=out.mask_BL).pred_BLP  # another atlas: the window's own covariance
    own = model.patchify(prior.impute(signal, mask_BRN, None, None, P, 0.05, 0.5))
    assert torch.allclose(other, own, atol=1e-6) and not torch.allclose(other, expected, atol=1e-3)
    out.loss.backward()  # the correction learns: the zero head gets a gradient, and after one step so does the rest
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(signal, coords).loss.backward()
    assert model.decoder_prior_embed.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "m")
    loaded = BrainLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.prior_cov_RR, model.prior_cov_RR)
    assert torch.equal(
        loaded(signal, coords, mask_BL=out.mask_BL).pred_BLP, model(signal, coords, mask_BL=out.mask_BL).pred_BLP
    )


def test_gaussian_prior_errors():
    with pytest.raises(ConfigError, match="norm_target"):
        tiny(decoder_prior="gaussian", norm_target=True)
    with pytest.raises(ConfigError, match=r"`model\.prior_shrinkage` must be in"):
        tiny(decoder_prior="gaussian", prior_shrinkage=1.5)
    with pytest.raises(InputError, match="no prior to fit"):
        build().fit_prior(torch.zeros(2, R, T), torch.zeros(R, 3))
    with pytest.raises(DimensionError, match=r"got windows \(2, 7, 24\) and coordinates \(8, 3\)"):
        build(decoder_prior="gaussian").fit_prior(torch.zeros(2, R, T), torch.zeros(R + 1, 3))
    with pytest.raises(DimensionError, match="learned parcel table"):
        build(decoder_prior="gaussian", learned_parcel_embedding=True).fit_prior(
            torch.zeros(2, R + 1, T), torch.zeros(R + 1, 3)
        )


def test_gaussian_prior_refits_on_another_atlas_and_saves_its_size(batch, tmp_path):
    """Refitted on another atlas's windows, the prior is that atlas's (not the window-only fallback), and the model
    saves and loads with the new size."""
    from brainlm.masking import sample_mask
    from brainlm.model import prior

    _, coords = batch
    model = build(decoder_prior="gaussian")
    model.fit_prior(torch.randn(20, R, T), coords)
    R2 = R + 3
    signal2, coords2 = torch.randn(B, R2, T), torch.randn(R2, 3) * 40
    train2 = torch.randn(30, R2, T) @ torch.randn(T, T) * 0.1
    mask_BL = sample_mask(B, R2, N, 0.5, generator=torch.Generator().manual_seed(0))
    mask_BRN = mask_BL.reshape(B, R2, N)
    c = model.config
    own = model.patchify(prior.impute(signal2, mask_BRN, None, None, P, c.prior_ridge, c.prior_shrinkage))
    assert torch.allclose(model.prior_patches(signal2, coords2, mask_BL), own, atol=1e-6)
    model.fit_prior(train2, coords2)
    mu, cov = prior.fit(train2)
    fitted = model.patchify(prior.impute(signal2, mask_BRN, mu, cov, P, c.prior_ridge, c.prior_shrinkage))
    assert torch.allclose(model.prior_patches(signal2, coords2, mask_BL), fitted, atol=1e-6)
    assert not torch.allclose(fitted, own, atol=1e-3)
    model.save_pretrained(tmp_path / "m")
    loaded = BrainLM.from_pretrained(tmp_path / "m")
    assert loaded.prior_cov_RR.shape == (R2, R2)
    assert torch.equal(
        loaded(signal2, coords2, mask_BL=mask_BL).pred_BLP, model(signal2, coords2, mask_BL=mask_BL).pred_BLP
    )
