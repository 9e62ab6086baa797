"""Frozen CLIP backbones from open_clip: a model name + pretrained tag, a local checkpoint, or the
embedded tiny CLIP shipped with the package.

    bb = load_backbone()                                   # embedded fpl-tiny-vit, offline
    bb = load_backbone("ViT-B-16", pretrained="openai")    # open_clip tag (local cache first)
    bb = load_backbone("ViT-B-16", checkpoint=Path("vit_b16.pt"))
    pooled, tokens = bb.encode_images(images_uint8)        # [N, D] fp32, [N, P, D] fp16

The architecture always comes from open_clip's config registry (`open_clip.list_models()`, plus
`fpl_bench/model_configs/*.json` registered here with `open_clip.add_model_config`); the weights
from exactly one place. Preprocessing is open_clip's eval transform built from the model's
preprocess config (for a tag: the mean/std/interpolation those weights were trained with).

Patch tokens follow FedOTP (HongxiaLee/FedOTP, `clip/model.py` VisionTransformer.forward): the
tokens after `ln_post`, projected by `visual.proj` into the joint space, like the pooled feature.
"""

from __future__ import annotations

import hashlib
import logging
import os
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

EMBEDDED = "fpl-tiny-vit"  # name of the embedded model (config in fpl_bench/model_configs/)
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
EMBEDDED_WEIGHTS = Path(__file__).parent / "assets" / f"{EMBEDDED}.pt"

_DIGEST_CHARS = 16


def register_model_configs() -> None:
    """Add `fpl_bench/model_configs/*.json` to open_clip's model registry (idempotent)."""
    if EMBEDDED not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class Backbone:
    """A frozen open_clip model (eval mode, no grad) with its tokenizer and eval transform."""

    name: str  # open_clip model name, e.g. "ViT-B-16" or "fpl-tiny-vit"
    tag: str  # pretrained tag, "checkpoint" (local file) or "embedded"
    model: torch.nn.Module  # open_clip CLIP, eval(), requires_grad False
    tokenizer: Callable[[list[str]], Tensor]  # list of T strings -> [T, context_length] int64
    preprocess: Callable[[Image.Image], Tensor]  # PIL image -> [3, H, W] float32
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode, ...
    weights_digest: str  # first 16 hex chars of the sha256 of the weights file
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
        visual.output_tokens = True  # forward then returns (pooled @ proj, tokens after ln_post)
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = False
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return pooled, tokens


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


# ----------------------------------------------------------------------------- loading


def load_backbone(
    name: str = EMBEDDED,
    *,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
    device: str = "cpu",
) -> Backbone:
    """Build open_clip model `name` with its weights from one source, frozen, in eval mode.

    Weights: `pretrained` (an open_clip tag: local cache first, then a download), `checkpoint`
    (a local torch file: a state dict or {"state_dict": ...}), or, for the embedded model with
    neither, the shipped `fpl_bench/assets/fpl-tiny-vit.pt` (fp16, cast to fp32 on load).
    For a tag trained with QuickGELU (e.g. OpenAI's), the model is built with QuickGELU.
    """
    register_model_configs()
    torch_device = _parse_device(device)
    if name not in open_clip.list_models():
        known = open_clip.list_models()
        examples = [EMBEDDED, *[m for m in ("ViT-B-32", "ViT-B-16", "RN50") if m in known]]
        raise UsageError(
            f"unknown open_clip model {name!r}; e.g. {', '.join(examples)} "
            f"({len(known)} known: see open_clip.list_models())"
        )
    if pretrained is not None and checkpoint is not None:
        raise UsageError("give either a pretrained tag or a checkpoint path, not both")

    tag_cfg: dict[str, Any] = {}
    if pretrained is not None:
        tag_cfg = _tag_cfg(name, pretrained)
        tag = pretrained.lower().replace("-", "_")  # open_clip's _clean_tag
        weights = _tag_weights(name, tag, tag_cfg)
    elif checkpoint is not None:
        tag, weights = "checkpoint", Path(checkpoint)
    elif name == EMBEDDED:
        tag, weights = "embedded", EMBEDDED_WEIGHTS
        if not weights.is_file():
            raise UsageError(
                f"embedded weights {weights} are missing; run `fpl-bench pretrain-tiny --out "
                f"{weights}` or pass --checkpoint PATH"
            )
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = f"--pretrained TAG (known: {', '.join(tags)}) or " if tags else ""
        raise UsageError(f"model {name} needs weights: pass {hint}--checkpoint PATH")

    with quiet_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
        )
    if pretrained is not None:
        open_clip.load_checkpoint(model, str(weights), strict=True)
    else:
        _load_weights(model, _read_state_dict(weights), source=weights)

    model = model.to(torch_device).eval().requires_grad_(False)
    return Backbone(
        name=name,
        tag=tag,
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess=preprocess,
        preprocess_cfg=dict(model.visual.preprocess_cfg),
        weights_digest=file_digest(weights),
        device=torch_device,
    )


def file_digest(path: Path) -> str:
    """First 16 hex characters of the sha256 of a file (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:_DIGEST_CHARS]


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


def _tag_cfg(name: str, tag: str) -> dict[str, Any]:
    if not open_clip.is_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags for {name}: {', '.join(tags)}" if tags else f"{name} has no tags"
        raise UsageError(f"unknown pretrained tag {tag!r}; {known}; or pass --checkpoint PATH")
    return dict(open_clip.get_pretrained_cfg(name, tag))


def _cached_tag_file(cfg: Mapping[str, Any]) -> Path | None:
    """The weights file of a tag if it is already on disk (no network), else None.

    Mirrors open_clip.download_pretrained: a 'file' entry, else the hub (safetensors first),
    else the URL cached under ~/.cache/clip.
    """
    if cfg.get("file"):
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for candidate in names:
            hit = try_to_load_from_cache(repo_id, candidate)
            if isinstance(hit, str):
                return Path(hit)
        return None
    url = cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return local if local.is_file() else None
    return None


def _tag_weights(name: str, tag: str, cfg: Mapping[str, Any]) -> Path:
    cached = _cached_tag_file(cfg)
    if cached is not None:
        return cached
    try:
        fetched = open_clip.download_pretrained(dict(cfg))
    except Exception as e:  # any network/hub failure: the fix is the same for the user
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"could not fetch weights for {name}:{tag} ({first_line}); download them elsewhere "
            f"and pass --checkpoint PATH"
        ) from e
    if not fetched:
        raise UsageError(f"open_clip has no source for {name}:{tag}; pass --checkpoint PATH")
    return Path(fetched)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a torch file: plain, or under "state_dict"; "module." prefix removed."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise UsageError(
            f"checkpoint {path} is not a readable torch file ({type(e).__name__})"
        ) from e
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise UsageError(f"checkpoint {path} holds no state dict of tensors")
    state = dict(loaded)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_weights(model: torch.nn.Module, state: Mapping[str, Tensor], *, source: Path) -> None:
    """Strict load; a key or shape mismatch is the user's file, so it is a UsageError."""
    expected = model.state_dict()
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
        raise UsageError(f"checkpoint {source} does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)  # copies, casting fp16 -> the model's dtype
