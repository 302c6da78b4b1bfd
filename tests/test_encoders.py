"""Encoder registry, weights loading (strict, safe) and the hand-crafted stain-texture descriptor."""

import os
import pickle

import numpy as np
import pytest
import torch

from workbench.features import encoders as E

SMALL_VIT = dict(depth=2, embed_dim=48, num_heads=2)  # same timm family and block types, tiny


def _tiles(n=6, seed=0, px=224):
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def _roundtrip(name, tmp_path, model_kwargs, fmt="safetensors"):
    """Random weights saved by the test, loaded back through get_encoder: outputs must be equal."""
    torch.manual_seed(0)
    ref = E.get_encoder(name, weights="random", model_kwargs=model_kwargs)
    sd = {k: v.clone().contiguous() for k, v in ref.model.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"model": sd}, str(path))
    torch.manual_seed(123)  # a different random init: only the file can make outputs equal
    enc = E.get_encoder(name, weights=path, model_kwargs=model_kwargs)
    tiles = _tiles(4)
    a, b = ref.encode(tiles), enc.encode(tiles)
    assert a.shape == (4, enc.dim)
    np.testing.assert_array_equal(a, b)
    assert enc.weights_digest == E.file_digest(path) and enc.weights_digest.startswith("sha256:")
    assert str(path) in enc.weights_source
    return ref, enc, sd, path


def test_registry_table_lists_published_settings():
    table = E.list_encoders().set_index("name")
    assert {"h-optimus-0", "uni", "ctranspath", "stain-texture", "timm:<model>"} <= set(table.index)
    assert table.loc["h-optimus-0", "dim"] == 1536 and table.loc["uni", "dim"] == 1024
    assert table.loc["ctranspath", "dim"] == 768 and table.loc["ctranspath", "mpp"] == 1.0
    assert table.loc["h-optimus-0", "weights"] == "gated"
    assert table.loc["stain-texture", "weights"].startswith("none")
    assert E.get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert E.get_spec("h-optimus-0").std == (0.211883, 0.230117, 0.177517)
    with pytest.raises(KeyError, match="unknown encoder"):
        E.get_spec("nope")


@pytest.mark.slow
def test_h_optimus_full_architecture_roundtrip(tmp_path):
    """The real ViT-g/14 (1.1 B parameters, random weights) saved and loaded back."""
    _, enc, _, _ = _roundtrip("h-optimus-0", tmp_path, None)
    assert enc.dim == 1536 and len(enc.model.blocks) == 40


def test_h_optimus_family_roundtrip_safetensors(tmp_path):
    ref, enc, _, _ = _roundtrip("h-optimus-0", tmp_path, SMALL_VIT)
    m = enc.model
    assert m.num_reg_tokens == 4 and m.patch_embed.patch_size == (14, 14)
    assert type(m.blocks[0].ls1).__name__ == "LayerScale"  # init_values=1e-5 gives layer scale
    assert type(m.blocks[0].mlp).__name__ == "GluMlp"  # SwiGLUPacked


def test_uni_roundtrip_torch_file_and_normalisation(tmp_path):
    _, enc, _, _ = _roundtrip("uni", tmp_path, SMALL_VIT, fmt="pth")
    x = enc.preprocess(np.full((1, 224, 224, 3), 255, np.uint8))
    expected = (1 - np.array(E.IMAGENET_MEAN)) / np.array(E.IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert enc.model.patch_embed.patch_size == (16, 16)


SMALL_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))


@pytest.mark.parametrize(
    "kwargs", [pytest.param(SMALL_SWIN, id="small"), pytest.param(None, id="full", marks=pytest.mark.slow)]
)
def test_ctranspath_architecture_and_original_key_names(tmp_path, kwargs):
    """Swin-T + ConvStem; a checkpoint in the original (timm 0.5) naming loads to equal outputs."""
    torch.manual_seed(0)
    ref = E.get_encoder("ctranspath", weights="random", model_kwargs=kwargs)
    assert ref.dim == (768 if kwargs is None else 128)
    assert type(ref.model.patch_embed).__name__ == "ConvStem"
    sd = ref.model.state_dict()
    old = {}
    for k, v in sd.items():  # timm >= 0.9 downsamples at the start of a stage, the original at the end
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        old[k] = v.clone()
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # buffers the original file carries
    assert "layers.1.downsample.reduction.weight" in sd and "layers.0.downsample.reduction.weight" in old
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": old}, str(path))
    enc = E.get_encoder("ctranspath", weights=path, model_kwargs=kwargs)
    tiles = _tiles(2)
    np.testing.assert_array_equal(ref.encode(tiles), enc.encode(tiles))


def test_timm_any_model_roundtrip_and_head_dropped(tmp_path):
    import timm

    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)  # with its classifier, as timm ships it
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), str(path))
    enc = E.get_encoder("timm:resnet18", weights=path)
    assert enc.dim == 512
    tiles = _tiles(2)
    full.reset_classifier(0)
    full.eval()
    with torch.inference_mode():
        expected = full(enc.preprocess(tiles)).numpy()
    np.testing.assert_allclose(enc.encode(tiles), expected, rtol=1e-5, atol=1e-6)


def test_wrong_key_is_refused(tmp_path):
    from safetensors.torch import save_file

    ref = E.get_encoder("uni", weights="random", model_kwargs=SMALL_VIT)
    sd = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    sd["blocks.0.attn.qkv.weigth"] = sd.pop("blocks.0.attn.qkv.weight")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(E.WeightsError, match=r"1 missing .*blocks.0.attn.qkv.weight.*1 unexpected"):
        E.get_encoder("uni", weights=tmp_path / "bad.safetensors", model_kwargs=SMALL_VIT)
    sd = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    sd["pos_embed"] = torch.zeros(1, 5, 48)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(E.WeightsError, match="shape mismatch for pos_embed"):
        E.get_encoder("uni", weights=tmp_path / "shape.safetensors", model_kwargs=SMALL_VIT)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (tmp_path / "evil.pth", tmp_path / "evil.bin"):
        if path.suffix == ".pth":
            torch.save({"model": _Evil()}, str(path))  # a zip checkpoint carrying code
        else:
            path.write_bytes(pickle.dumps({"model": _Evil()}))  # a legacy raw pickle
        with pytest.raises(E.WeightsError, match="refused"):
            E.get_encoder("uni", weights=path, model_kwargs=SMALL_VIT)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORKBENCH_WEIGHTS_DIR", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(E.WeightsError, match=r"huggingface-cli download bioptimus/H-optimus-0.*weights=<file>"):
        E.get_encoder("h-optimus-0", model_kwargs=SMALL_VIT)
    with pytest.raises(E.WeightsError, match="does not exist"):
        E.get_encoder("uni", weights=tmp_path / "nope.safetensors", model_kwargs=SMALL_VIT)


def test_weights_dir_lookup(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    ref = E.get_encoder("uni", weights="random", model_kwargs=SMALL_VIT)
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(tmp_path / "uni.safetensors"))
    monkeypatch.setenv("WORKBENCH_WEIGHTS_DIR", str(tmp_path))
    enc = E.get_encoder("uni", model_kwargs=SMALL_VIT)
    assert enc.weights_source == f"file {tmp_path / 'uni.safetensors'}"
    np.testing.assert_array_equal(ref.encode(_tiles(2)), enc.encode(_tiles(2)))


# --------------------------------------------------------------------------- stain-texture


def _hne_tiles(kind: str, n: int, seed: int) -> np.ndarray:
    """Tiles of a few textures in H&E-like colours, and pen strokes."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, 112, 112, 3), np.uint8)
    for i in range(n):
        t = np.full((112, 112, 3), (235, 170, 210), np.uint8)  # eosin-pink stroma
        if kind == "nuclei":  # dense purple nuclei
            for _ in range(60):
                c = tuple(int(v) for v in rng.integers(0, 112, 2))
                cv2.circle(t, c, int(rng.integers(2, 5)), (90, 50, 150), -1)
        elif kind == "fibres":  # pink stroma with wavy fibres
            for _ in range(12):
                y = int(rng.integers(0, 112))
                cv2.line(t, (0, y), (111, y + int(rng.integers(-20, 20))), (200, 110, 170), 2)
        elif kind == "pen":  # stroma under thick blue-green ink
            t[:] = (40, 110, 120)
        t = np.clip(t + rng.normal(0, 6, t.shape), 0, 255).astype(np.uint8)
        out[i] = t
    return out


def test_stain_texture_is_deterministic_documented_and_separates_classes():
    enc = E.get_encoder("stain-texture")
    assert enc.checkpoint_free and "hand-crafted" in enc.attrs()["encoder_kind"]
    assert enc.weights_source.startswith("none: hand-crafted descriptor")
    assert enc.weights_digest == E.get_encoder("stain-texture").weights_digest
    assert 64 <= enc.dim <= 256
    with pytest.raises(E.WeightsError, match="takes no weights"):
        E.get_encoder("stain-texture", weights="x.pth")
    kinds = ["nuclei", "fibres", "pen"]
    tiles = np.concatenate([_hne_tiles(k, 20, seed=i) for i, k in enumerate(kinds)])
    y = np.repeat(np.arange(3), 20)
    f1 = enc.encode(tiles)
    np.testing.assert_array_equal(f1, enc.encode(tiles))
    assert f1.shape == (60, enc.dim) and np.isfinite(f1).all()
    # 224-px input is resized to the descriptor's 112 px by the preprocess
    big = np.repeat(np.repeat(tiles[:3], 2, axis=1), 2, axis=2)
    assert enc.encode(big).shape == (3, enc.dim)
    # nearest class centroid (leave-one-out) is perfect on these distinct textures
    d = ((f1[:, None] - f1[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() == 1.0
    # pen tiles: saturated hue away from H&E; the hue block is the 5th histogram
    sat_mean = f1[:, -3]
    assert sat_mean[y == 2].min() > sat_mean[y != 2].max()


def test_stain_texture_matches_rgb2hed_means():
    """The stain statistics agree with skimage.color.rgb2hed on the same pixels (5-bit colour cells)."""
    from skimage.color import rgb2hed

    from workbench.features import descriptors as D

    tiles = _hne_tiles("nuclei", 4, seed=3)
    f = E.stain_texture_features(tiles)
    hed = rgb2hed(tiles[:, ::2, ::2].reshape(-1, 56, 3)).reshape(4, -1, 3)
    expected = np.maximum(hed, 0).mean(1) / np.array(D.STAIN_RANGES)
    n_hist = sum(D._BLOCKS)
    np.testing.assert_allclose(f[:, n_hist : n_hist + 3], expected, atol=0.02)


def test_stain_texture_speed():
    import time

    tiles = np.random.default_rng(0).integers(0, 256, (512, 112, 112, 3), dtype=np.uint8)
    E.stain_texture_features(tiles[:8])
    t0 = time.perf_counter()
    E.stain_texture_features(tiles)
    rate = 512 / (time.perf_counter() - t0)
    assert rate > 150, f"stain-texture at {rate:.0f} tiles/s"  # ≥ 500/s on an idle 2-core machine
