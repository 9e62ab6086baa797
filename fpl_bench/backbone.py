"""Frozen CLIP backbones from open_clip: a model name (or model-config JSON) and weights from a
pretrained tag, a local file, random init, or the embedded tiny CLIP shipped with the package.

    bb = load_backbone()                                     # embedded fpl-tiny-vit, offline
    bb = load_backbone("ViT-B-16", pretrained="openai")      # open_clip tag (local cache first)
    bb = load_backbone("ViT-B-16", pretrained="~/w/ViT-B-16.pt")  # a file (OpenAI's .pt too)
    bb = load_backbone("my-vit.json", pretrained="none")     # custom architecture, random init
    pooled, tokens = bb.encode_images(images_uint8)          # [N, D] fp32, [N, P, D] fp16

The architecture always comes from open_clip's config registry (`open_clip.list_models()`, plus
`fpl_bench/model_configs/*.json` and any model-config file given by path, registered here with
`open_clip.add_model_config`); the weights from exactly one place, found by
`fpl_bench.weight_sources` (a tag's file in the local caches or downloaded, a local file, random
init, the embedded default) and read by `fpl_bench.weights` without running code stored in
them. This module builds the model from that source and holds the `Backbone` that encodes
images and texts. Preprocessing is open_clip's eval transform built from the model's
preprocess config (for a tag: the mean/std/interpolation those weights were trained with).

Patch tokens follow FedOTP (HongxiaLee/FedOTP, `clip/model.py` VisionTransformer.forward): the
tokens after `ln_post`, projected by `visual.proj` into the joint space, like the pooled feature.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.weight_sources import (
    EMBEDDED,
    RANDOM_INIT_SEED,
    weights_digest,
    weights_source,
    why_not_a_file,
)
from fpl_bench.weights import is_torchscript, read_weights

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Add `fpl_bench/model_configs/*.json` to open_clip's model registry (idempotent)."""
    if EMBEDDED not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def visual_features(model: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled [B, D] and projected patch tokens [B, P, D] of a ViT open_clip model, unnormalised:
    the tokens after `ln_post` (open_clip's `output_tokens`: forward then returns
    (pooled @ proj, tokens)), times `visual.proj`. Differentiable; the feature cache
    (`Backbone.encode_images`) and pretraining (fpl_bench/pretrain.py) both use it.
    """
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(x)
    finally:
        visual.output_tokens = False
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    return pooled, tokens


@dataclass
class Backbone:
    """A frozen open_clip model (eval mode, no grad) with its tokenizer and eval transform."""

    name: str  # open_clip model name, e.g. "ViT-B-16" or "fpl-tiny-vit"
    tag: str  # pretrained tag, "checkpoint" (local file), "random" or "embedded"
    model: torch.nn.Module  # open_clip CLIP, eval(), requires_grad False
    tokenizer: Callable[[list[str]], Tensor]  # list of T strings -> [T, context_length] int64
    preprocess: Callable[[Image.Image], Tensor]  # PIL image -> [3, H, W] float32
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode, ...
    weights_digest: str  # 16 hex chars of the sha256 of the weights file (random: of its recipe)
    device: torch.device

    def encode_images(
        self, images: np.ndarray, *, batch_size: int = 256, with_tokens: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Image features of uint8 images [N, H, W, 3], returned on the CPU.

        Returns pooled [N, D] float32 and patch tokens [N, P, D] float16 (P = grid cells), both
        L2-normalised in the joint image-text space. With `with_tokens=False` the tokens are an
        empty [N, 0, D] tensor (and any visual tower is accepted, not only a ViT).
        """
        images = _check_images(images)
        inputs = (
            self._to_model_input(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        )
        return self.encode_inputs(inputs, n=len(images), with_tokens=with_tokens)

    def encode_inputs(
        self, inputs: Iterable[Tensor], *, n: int, with_tokens: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Image features of preprocessed batches [B, 3, H, W] (this backbone's `preprocess`
        applied, e.g. by `fpl_bench.data.loading.preprocessed_batches`), `n` images in all;
        returns what `encode_images` returns."""
        if with_tokens and not isinstance(self.model.visual, VisionTransformer):
            kind = type(self.model.visual).__name__
            raise UsageError(
                f"backbone {self.name} has no patch tokens (visual tower {kind}); use a ViT model"
            )
        pooled_parts: list[Tensor] = []
        token_parts: list[Tensor] = []
        with torch.inference_mode():
            for x in inputs:
                pooled, tokens = self._forward_visual(x.to(self.device), with_tokens=with_tokens)
                pooled_parts.append(F.normalize(pooled.float(), dim=-1).cpu())
                if with_tokens:
                    token_parts.append(F.normalize(tokens.float(), dim=-1).half().cpu())
        dim = self.embed_dim
        pooled_all = torch.cat(pooled_parts) if pooled_parts else torch.empty(0, dim)
        if with_tokens and token_parts:
            tokens_all = torch.cat(token_parts)
        else:
            n_tokens = self.n_patches if with_tokens else 0
            tokens_all = torch.empty(n, n_tokens, dim, dtype=torch.float16)
        return pooled_all, tokens_all

    def embed_images(self, images: np.ndarray, *, batch_size: int = 256) -> Tensor:
        """The image tower's input tokens [N, 1 + P, W_v] (below its first block:
        `vision.VisionTower.embed`) of uint8 images [N, H, W, 3], float32 on the CPU."""
        images = _check_images(images)
        inputs = (
            self._to_model_input(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        )
        return self.embed_inputs(inputs, n=len(images))

    def embed_inputs(self, inputs: Iterable[Tensor], *, n: int) -> Tensor:
        """`embed_images` of preprocessed batches [B, 3, H, W], `n` images in all."""
        from fpl_bench.vision import VisionTower

        vision = VisionTower.of(self.model)
        dtype = next(self.model.parameters()).dtype
        parts = []
        with torch.inference_mode():
            for x in inputs:
                parts.append(vision.embed(x.to(self.device, dtype)).float().cpu())
        if parts:
            return torch.cat(parts)
        return torch.empty(n, 1 + self.n_patches, vision.width)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 1024) -> Tensor:
        """Text features [T, D] float32, L2-normalised, on the CPU."""
        parts: list[Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                parts.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.empty(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        """D, the width of the joint image-text space."""
        return int(self.model.text_projection.shape[-1])

    @property
    def n_patches(self) -> int:
        """P, the number of patch tokens of a ViT tower (grid height x grid width)."""
        grid = self.model.visual.grid_size
        return int(grid[0] * grid[1])

    def _to_model_input(self, images: np.ndarray) -> Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H', W'] on the device.

        Images already at the model's size skip PIL: Resize and CenterCrop are then identities
        (PIL returns a copy when asked for its own size), so ToTensor + Normalize done on the
        whole batch gives the same tensor as the PIL transform (tested).
        """
        height, width = images.shape[1:3]
        if (height, width) == tuple(self.preprocess_cfg["size"]):
            x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div(255)
            mean = torch.tensor(self.preprocess_cfg["mean"], device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(self.preprocess_cfg["std"], device=self.device).view(1, 3, 1, 1)
            return x.sub_(mean).div_(std)
        batch = [self.preprocess(Image.fromarray(image)) for image in images]
        return torch.stack(batch).to(self.device)

    def _forward_visual(self, x: Tensor, *, with_tokens: bool) -> tuple[Tensor, Tensor]:
        """Pooled [B, D] and projected patch tokens [B, P, D] (empty when not asked for)."""
        visual = self.model.visual
        x = x.to(next(self.model.parameters()).dtype)
        if not with_tokens:
            pooled = visual(x)
            return pooled, pooled.new_empty(len(x), 0, pooled.shape[-1])
        return visual_features(self.model, x)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


# ----------------------------------------------------------------------------- loading


def load_backbone(
    name: str = EMBEDDED,
    *,
    pretrained: str | Path | None = None,
    checkpoint: Path | None = None,
    device: str = "cpu",
) -> Backbone:
    """Build open_clip model `name` with its weights from one source, frozen, in eval mode.

    `name`: an open_clip model (`open_clip.list_models()`: ViT-B-16, ViT-L-14, RN50, ...), the
    embedded `fpl-tiny-vit`, or the path of an open_clip model-config JSON file (a custom
    architecture, registered under the file's stem).

    `pretrained` (or `checkpoint`, its alias for a path; give one of the two) says where the
    weights come from, found by `fpl_bench.weight_sources.weights_source`:
    - an open_clip tag (`openai`, `laion2b_s34b_b88k`, ...): its file from the local caches,
      else downloaded when downloads are allowed and the host answers; otherwise a one-line
      UsageError names the files it looked for. The model is built with the tag's QuickGELU
      and normalisation settings.
    - a file path (an existing file, or any value with a path separator or a weights suffix):
      a state dict, `{"state_dict": ...}`, safetensors, or an OpenAI-format CLIP file (the
      TorchScript archive or its state dict, as CoOp and its forks load them), read by
      `fpl_bench.weights.read_weights` without running code from the file; OpenAI-format
      weights are built with QuickGELU.
    - `none`: random weights, seeded (`RANDOM_INIT_SEED`), for speed work.
    With neither, the embedded model loads the shipped `fpl_bench/assets/fpl-tiny-vit.pt`
    (fp16, cast to fp32).
    """
    register_model_configs()
    torch_device = _parse_device(device)
    name = resolve_model_name(name)
    source = weights_source(name, pretrained=pretrained, checkpoint=checkpoint)
    state, quick_gelu = None, bool(source.tag_cfg.get("quick_gelu", False))
    torchscript = False
    if source.kind in ("file", "embedded") or (
        source.kind == "tag" and source.path is not None and is_torchscript(source.path)
    ):
        assert source.path is not None
        state, info = read_weights(source.path)
        quick_gelu = quick_gelu or info.quick_gelu
        torchscript = info.kind == "torchscript"
    model, preprocess = _build_model(
        name, tag_cfg=source.tag_cfg, quick_gelu=quick_gelu, seeded=source.kind == "random"
    )
    if state is not None:
        _load_weights(model, state, source=source.path, ignore_extra=torchscript)
    elif source.kind == "tag":
        open_clip.load_checkpoint(model, str(source.path), strict=True)
    model = model.to(torch_device).eval().requires_grad_(False)
    return Backbone(
        name=name,
        tag=source.tag,
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess=preprocess,
        preprocess_cfg=dict(model.visual.preprocess_cfg),
        weights_digest=weights_digest(name, source, quick_gelu=quick_gelu),
        device=torch_device,
    )


def resolve_model_name(name: str) -> str:
    """`name` itself, or for the path of an open_clip model-config JSON file, its stem (the
    file is registered with `open_clip.add_model_config`). UsageError for an unknown name, or
    a config file that is missing, malformed, or shadows a registered model it differs from."""
    if name.lower().endswith(".json"):
        name = _register_config_file(Path(name).expanduser())
    known = open_clip.list_models()
    if name not in known:
        examples = [EMBEDDED, *[m for m in ("ViT-B-32", "ViT-B-16", "RN50") if m in known]]
        raise UsageError(
            f"unknown open_clip model {name!r}; e.g. {', '.join(examples)} "
            f"({len(known)} known: see open_clip.list_models()), or a model-config .json file"
        )
    return name


def _register_config_file(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"model config {path} {why_not_a_file(path)}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"model config {path} is not readable JSON ({err})") from None
    required = ("embed_dim", "vision_cfg", "text_cfg")
    missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UsageError(
            f"model config {path} lacks {', '.join(missing)}; an open_clip model config has "
            "embed_dim, vision_cfg and text_cfg (like open_clip's model_configs/ViT-B-16.json)"
        )
    stem = path.stem
    if stem in open_clip.list_models():
        if open_clip.get_model_config(stem) != cfg:
            raise UsageError(
                f"model config {path} is named like the registered model {stem} but differs "
                "from it; rename the file"
            )
        return stem
    open_clip.add_model_config(path)
    return stem


def _build_model(
    name: str, *, tag_cfg: Mapping[str, Any], quick_gelu: bool, seeded: bool
) -> tuple[torch.nn.Module, Callable[[Image.Image], Tensor]]:
    """open_clip's architecture `name` (random init) and its eval transform; with `seeded`
    the init draws from `RANDOM_INIT_SEED` without touching the caller's RNG state."""
    with quiet_random_init(), torch.random.fork_rng(devices=[], enabled=seeded):
        if seeded:
            torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None,
            force_quick_gelu=quick_gelu,
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
        )
    return model, preprocess


def _parse_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return torch_device


@contextmanager
def quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning: our weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


# ----------------------------------------------------------------------------- state dicts


def _load_weights(
    model: torch.nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: Path | None,
    ignore_extra: bool = False,
) -> None:
    """Strict load; a key or shape mismatch is the user's file, so it is a UsageError.

    `ignore_extra` drops keys the model does not have (a TorchScript archive also holds tensor
    attributes that are not state, e.g. attention masks); missing keys and shapes still fail.
    """
    expected = model.state_dict()
    if ignore_extra:
        state = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", wrong_shape),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UsageError(f"weights {source} do not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)  # copies, casting fp16 -> the model's dtype
