"""Tile encoders: one registry of named encoders, each returning everything a caller needs.

``get_encoder(name, weights=...)`` builds an :class:`Encoder` — the model (eval mode, on CPU), its
``preprocess`` (uint8 NHWC tiles → normalised float NCHW at the encoder's input size), output ``dim``,
``input_px``, ``mpp``, ``mean``/``std``, preferred CUDA ``precision``, and which weights were used
(``weights_source``, text) with their ``weights_digest`` (sha256 of the weights file, or of the
descriptor's definition for the checkpoint-free encoder). ``list_encoders()`` shows the registry.

Registered (published settings: Saillard et al. 2024 H-optimus-0; Chen et al. 2024 UNI; Wang et al. 2022 CTransPath): ``h-optimus-0`` (ViT-g/14, 4 registers), ``uni`` (ViT-L/16), ``ctranspath``
(Swin-T with a convolutional stem), ``timm:<model name>`` for any timm model, and ``stain-texture``, a
**hand-crafted colour/texture descriptor** (no learned weights; see :mod:`workbench.features.descriptors`).

Weights are found, in order: an explicit ``weights=`` file (``.safetensors``, or a torch file loaded
with ``weights_only=True`` — a pickle that carries code is refused); ``$WORKBENCH_WEIGHTS_DIR/<name>``;
the user's Hugging Face cache (looked up offline with ``try_to_load_from_cache``: never touches the
network); the hub itself only with ``allow_download=True``. Keys must match the architecture exactly
(strict). ``weights="random"`` builds random weights, for tests and benchmarks only. When nothing is
found the error says how to get the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.errors import WeightsError
from workbench.features.descriptors import (  # noqa: F401  (stain_texture_features re-exported for users)
    stain_texture_features,
    stain_texture_module_class,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
RANDOM = "random"


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how to build an encoder and where its weights come from."""

    name: str
    architecture: str
    input_px: int
    mpp: float | None
    dim: int
    mean: tuple
    std: tuple
    build: Callable
    hub: str | None = None
    gated: bool = False
    checkpoint_free: bool = False
    precision: str = "bf16"
    key_filter: Callable | None = None
    how_to_get: str = ""


@dataclass
class Encoder:
    """A ready encoder. ``model(preprocess(tiles))`` gives (n, dim) features."""

    name: str
    model: object
    preprocess: Callable
    dim: int
    input_px: int
    mpp: float | None
    mean: tuple
    std: tuple
    precision: str
    weights_digest: str
    weights_source: str
    architecture: str
    checkpoint_free: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "hand-crafted descriptor (no learned weights)" if self.checkpoint_free else "neural network"

    def attrs(self) -> dict:
        """What every output written with this encoder records about it."""
        return {
            "encoder": self.name,
            "architecture": self.architecture,
            "encoder_kind": self.kind,
            "weights_digest": self.weights_digest,
            "weights_source": self.weights_source,
            "dim": int(self.dim),
            "input_px": int(self.input_px),
            "encoder_mpp": self.mpp,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def encode(self, tiles: np.ndarray, *, device: str = "cpu") -> np.ndarray:
        """Features of (n, h, w, 3) uint8 tiles as (n, dim) float32 (fp32, no batching: for small inputs)."""
        import torch

        with torch.inference_mode():
            x = self.preprocess(torch.as_tensor(np.ascontiguousarray(tiles)).to(device))
            return self.model.to(device)(x).float().cpu().numpy()


class Preprocess:
    """Tiles → model input. uint8 (n, h, w, 3) tiles (numpy or torch, any device) become float
    (n, 3, px, px), resized (bilinear, antialiased) and normalised with mean/std; with ``raw=True``
    (the hand-crafted descriptor) they stay uint8 (n, px, px, 3), resized with area averaging.
    """

    def __init__(self, input_px: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), *, raw: bool = False):
        self.input_px, self.mean, self.std, self.raw = int(input_px), tuple(mean), tuple(std), bool(raw)
        self._stats: dict = {}

    def __call__(self, batch):
        import torch
        import torch.nn.functional as F

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected (n, h, w, 3) tiles, got shape {tuple(batch.shape)}")
        px = self.input_px
        if self.raw:
            if tuple(batch.shape[1:3]) == (px, px):
                return batch
            import cv2

            arr = batch.cpu().numpy()
            out = (
                np.stack([cv2.resize(t, (px, px), interpolation=cv2.INTER_AREA) for t in arr])
                if len(arr)
                else (np.zeros((0, px, px, 3), np.uint8))
            )
            return torch.from_numpy(out).to(batch.device)
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != (px, px):
            x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        if self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0):
            key = str(x.device)
            if key not in self._stats:  # built once per device: no host-to-device copy per batch
                self._stats[key] = (
                    torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1),
                    torch.tensor(self.std, device=x.device).view(1, 3, 1, 1),
                )
            mean, std = self._stats[key]
            x = (x - mean) / std
        return x.contiguous()

    def __repr__(self):
        return f"Preprocess(input_px={self.input_px}, mean={self.mean}, std={self.std}, raw={self.raw})"


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, EncoderSpec] = {}


def register(name: str, **spec):
    """Decorator registering a builder ``build(**model_kwargs) -> nn.Module`` (random init) under ``name``."""

    def deco(build):
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = EncoderSpec(name=name, build=build, **spec)
        return build

    return deco


def _timm_spec(name: str) -> EncoderSpec:
    import timm

    arch = name.split(":", 1)[1]
    if not arch:
        raise ValueError("give a timm model name after 'timm:', e.g. 'timm:vit_large_patch16_224'")
    try:
        cfg = timm.models.get_pretrained_cfg(arch) or None
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is None and not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"{arch!r} is not a timm model (see timm.list_models())")
    size = (getattr(cfg, "input_size", None) or (3, 224, 224))[-1]
    mean = tuple(getattr(cfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(cfg, "std", None) or IMAGENET_STD)
    hub = f"hf-hub:{cfg.hf_hub_id}" if cfg is not None and getattr(cfg, "hf_hub_id", None) else None

    def build(**kw):
        return timm.create_model(arch, pretrained=False, num_classes=0, **kw)

    return EncoderSpec(
        name=name,
        architecture=f"timm {arch}",
        input_px=int(size),
        mpp=None,
        dim=-1,
        mean=mean,
        std=std,
        build=build,
        hub=hub,
        how_to_get=f"timm's pretrained weights for {arch}",
    )


def get_spec(name: str) -> EncoderSpec:
    if name.startswith("timm:"):
        return _timm_spec(name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {sorted(_REGISTRY)} or 'timm:<model name>'")
    return _REGISTRY[name]


def list_encoders():
    """The registry as a table: name, architecture, input px, mpp, dim, weights, hub."""
    import pandas as pd

    rows = [
        {
            "name": s.name,
            "architecture": s.architecture,
            "input_px": s.input_px,
            "mpp": s.mpp,
            "dim": s.dim,
            "weights": "none (hand-crafted)" if s.checkpoint_free else ("gated" if s.gated else "open"),
            "hub": s.hub or "",
        }
        for s in _REGISTRY.values()
    ]
    rows.append(
        {
            "name": "timm:<model>",
            "architecture": "any timm model",
            "input_px": None,
            "mpp": None,
            "dim": None,
            "weights": "timm hub / file",
            "hub": "timm/<model>",
        }
    )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- architectures


def _conv_stem_class():
    import torch.nn as nn

    class ConvStem(nn.Module):
        """CTransPath's patch embedding: two stride-2 3×3 conv+BN+ReLU, then a 1×1 conv; NHWC output."""

        def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **_):
            super().__init__()
            if patch_size != 4 or embed_dim % 8:
                raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
            img = img_size if isinstance(img_size, tuple) else (img_size, img_size)
            self.img_size, self.patch_size = img, (4, 4)
            self.grid_size = (img[0] // 4, img[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            layers, cin, cout = [], in_chans, embed_dim // 8
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin, cout = cout, cout * 2
            layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*layers)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            return self.norm(self.proj(x).permute(0, 2, 3, 1))

    return ConvStem


def _swin_key_filter(sd: dict, model) -> dict:
    """Original (timm 0.5) Swin checkpoints → current timm names; drops non-persistent buffers and any head."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    sd = checkpoint_filter_fn(sd, model)
    dropped = [k for k in sd if k.startswith("head.")]
    if dropped:
        log.info("ctranspath: dropping classifier keys %s (the encoder is headless)", dropped)
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@register(
    "h-optimus-0",
    architecture="ViT-g/14, 4 registers (timm vit_giant_patch14_reg4_dinov2)",
    input_px=224,
    mpp=0.5,
    dim=1536,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    hub="hf-hub:bioptimus/H-optimus-0",
    gated=True,
    how_to_get="accept the terms at https://huggingface.co/bioptimus/H-optimus-0, `huggingface-cli login`, "
    "`huggingface-cli download bioptimus/H-optimus-0`",
)
def _h_optimus_0(**kw):
    import timm

    args = dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False)
    return timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, **{**args, **kw})


@register(
    "uni",
    architecture="ViT-L/16 (timm vit_large_patch16_224)",
    input_px=224,
    mpp=0.5,
    dim=1024,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    hub="hf-hub:MahmoodLab/uni",
    gated=True,
    how_to_get="accept the terms at https://huggingface.co/MahmoodLab/UNI, `huggingface-cli login`, "
    "`huggingface-cli download MahmoodLab/UNI`",
)
def _uni(**kw):
    import timm

    args = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return timm.create_model("vit_large_patch16_224", pretrained=False, **{**args, **kw})


@register(
    "ctranspath",
    architecture="Swin-T with convolutional stem (CTransPath), head removed",
    input_px=224,
    mpp=1.0,
    dim=768,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    hub=None,
    gated=True,
    key_filter=_swin_key_filter,
    how_to_get="download ctranspath.pth from https://github.com/Xiyue-Wang/TransPath and pass weights=<path>",
)
def _ctranspath(**kw):
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=_conv_stem_class(), **kw
    )


@register(
    "stain-texture",
    architecture="hand-crafted: H&E stain histograms + LBP/gradient texture (2 scales)",
    input_px=112,
    mpp=None,
    dim=153,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    checkpoint_free=True,
    precision="fp32",
)
def _stain_texture(**kw):
    return stain_texture_module_class()(**kw)


# --------------------------------------------------------------------------- weights


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_digest(str(p), st.st_size, st.st_mtime_ns)


_DIGESTS: dict = {}


def _file_digest(path: str, size: int, mtime: int) -> str:
    key = (path, size, mtime)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint's tensors safely: safetensors, or ``torch.load(weights_only=True)``.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and a ``module.`` prefix. Raises
    :class:`WeightsError` for a missing file, a pickle that is not plain tensors, or non-tensor values.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
            raise WeightsError(f"weights file {path}: not a valid safetensors file ({exc})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            raise WeightsError(
                f"weights file {path} refused: it is not a plain tensor checkpoint loadable with "
                f"weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "convert it to .safetensors from a trusted source"
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"weights file {path}: no state dict of tensors inside")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"weights file {path}: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def apply_state_dict(model, sd: dict, *, name: str, source: str) -> None:
    """Load ``sd`` into ``model`` with strict key and shape matching; clear error otherwise."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        if wrong:
            parts.append(
                "shape mismatch for "
                + ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:3])
            )
        raise WeightsError(f"weights {source} do not match encoder {name!r}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _find_local(name: str) -> Path | None:
    root = os.environ.get("WORKBENCH_WEIGHTS_DIR")
    if not root:
        return None
    stem = name.replace(":", "-").replace("/", "__")
    for cand in (
        f"{stem}.safetensors",
        f"{stem}.pth",
        f"{stem}.bin",
        f"{stem}/model.safetensors",
        f"{stem}/pytorch_model.bin",
    ):
        p = Path(root) / cand
        if p.is_file():
            return p
    return None


def _find_cached(hub: str | None, *, allow_download: bool) -> Path | None:
    """The weights file of a hub repo from the local Hugging Face cache (offline), or downloaded if allowed."""
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo = hub.removeprefix("hf-hub:")
    names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    for fname in names:
        p = try_to_load_from_cache(repo, fname)
        if isinstance(p, str) and Path(p).is_file():
            return Path(p)
    if allow_download:
        from huggingface_hub import hf_hub_download

        for fname in names[:2]:
            try:
                return Path(hf_hub_download(repo, fname, etag_timeout=10))
            except Exception as exc:  # hub errors: gated, missing file, network
                log.info("hub %s/%s: %s", repo, fname, exc)
    return None


def get_encoder(
    name: str = "stain-texture",
    *,
    weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    model_kwargs: dict | None = None,
) -> Encoder:
    """Build a registered encoder with its weights (see the module docstring for where they are found).

    Parameters
    ----------
    name : registry name or ``timm:<model>``
    weights : a checkpoint file, ``"random"`` (random init: tests/benchmarks), or None to search
    allow_download : let the hub be contacted when the weights are not in the local cache
    model_kwargs : architecture overrides (e.g. a small ``depth`` for tests); the dim follows the model
    """
    spec = get_spec(name)
    model = spec.build(**(model_kwargs or {}))
    model.eval()
    if spec.checkpoint_free:
        if weights not in (None, RANDOM):
            raise WeightsError(f"encoder {name!r} is a hand-crafted descriptor and takes no weights (got {weights!r})")
        definition = json.dumps({"name": name, **model.definition()}, sort_keys=True)
        digest = "sha256:" + hashlib.sha256(definition.encode()).hexdigest()
        source = f"none: hand-crafted descriptor {model.version} (no learned weights)"
    elif weights == RANDOM:
        digest = f"random-init:{name}:{json.dumps(model_kwargs or {}, sort_keys=True)}"
        source = "random initialisation (no pretrained weights; for tests and benchmarks only)"
    else:
        path = (
            Path(weights)
            if weights is not None
            else _find_local(name) or _find_cached(spec.hub, allow_download=allow_download)
        )
        if path is None:
            raise WeightsError(
                f"no weights found for encoder {name!r}: not given (weights=...), not in $WORKBENCH_WEIGHTS_DIR, "
                f"not in the Hugging Face cache{f' for {spec.hub}' if spec.hub else ''}. To get them: "
                f"{spec.how_to_get or 'download a checkpoint and pass weights=<path>'}; or pass weights=<file>"
            )
        sd = load_state_dict(path)
        if spec.key_filter is not None:
            sd = spec.key_filter(sd, model)
        elif name.startswith("timm:"):
            sd = _drop_timm_classifier(sd, model)
        apply_state_dict(model, sd, name=name, source=str(path))
        digest, source = file_digest(path), f"file {path}"
    dim = int(getattr(model, "num_features", spec.dim))
    if spec.dim > 0 and not model_kwargs and dim != spec.dim:
        raise WeightsError(f"encoder {name!r} built with dim {dim}, registry says {spec.dim}")
    log.info("encoder %s: %s, weights %s (%s)", name, spec.architecture, source, digest[:19])
    preprocess = Preprocess(spec.input_px, spec.mean, spec.std, raw=spec.checkpoint_free)
    return Encoder(
        name=name,
        model=model,
        preprocess=preprocess,
        dim=dim,
        input_px=spec.input_px,
        mpp=spec.mpp,
        mean=spec.mean,
        std=spec.std,
        precision=spec.precision,
        weights_digest=digest,
        weights_source=source,
        architecture=spec.architecture,
        checkpoint_free=spec.checkpoint_free,
    )


def _drop_timm_classifier(sd: dict, model) -> dict:
    """A timm checkpoint with a classifier, loaded into the headless (num_classes=0) model: drop the head."""
    own = set(model.state_dict())
    head = (model.pretrained_cfg or {}).get("classifier", "head")
    heads = head if isinstance(head, (list, tuple)) else [head]
    extra = [k for k in sd if k not in own and any(k.startswith(h + ".") for h in heads)]
    return {k: v for k, v in sd.items() if k not in extra}
