"""Where a backbone's weights come from, and the digest of them that keys the feature cache.

    source = weights_source("ViT-B-16", pretrained="openai", checkpoint=None)
    source.kind, source.path    # "tag", the file in the hub cache (or just downloaded)
    weights_digest("ViT-B-16", source, quick_gelu=True)    # 16 hex chars of a sha256

A backbone's weights come from exactly one place (`WeightsSource.kind`):

- **tag**: an open_clip pretrained tag (`openai`, `laion2b_s34b_b88k`, ...). Its file is looked
  up where `open_clip.download_pretrained` would put it (the Hugging Face hub cache, then
  `~/.cache/clip` for URL tags) and downloaded only when not found, downloads are allowed (none
  of `OFFLINE_ENV` set) and the host answers within `PROBE_TIMEOUT_S`; otherwise a one-line
  UsageError names the files it looked for. The source carries open_clip's pretrained config
  of the tag (QuickGELU, the mean/std/interpolation those weights were trained with).
- **file**: a local weights file (an existing file, or any value with a path separator, a
  leading ~ or one of `WEIGHT_SUFFIXES`).
- **random**: `--pretrained none`, weights drawn from `RANDOM_INIT_SEED`.
- **embedded**: the tiny CLIP shipped with the package (`EMBEDDED_WEIGHTS`), the default of
  the `EMBEDDED` model when no weights are named.

A file is located here, never read: `fpl_bench.weights` reads it without running code stored
in it, and `fpl_bench.backbone` builds the model from the source. The digest is the sha256
prefix of the weights file; for random weights, of what fixes them (model config, seed,
activation, library versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import open_clip
import torch

from fpl_bench.errors import UsageError

EMBEDDED = "fpl-tiny-vit"  # name of the embedded model (config in fpl_bench/model_configs/)
EMBEDDED_WEIGHTS = Path(__file__).parent / "assets" / f"{EMBEDDED}.pt"
NO_WEIGHTS = "none"  # --pretrained none: random weights (seeded), for speed work
RANDOM_INIT_SEED = 0
# A --pretrained value with one of these suffixes (or a path separator) is a file, not a tag.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
# Any of these set to 1/true/yes/on: never try the network for a tag (huggingface_hub's own
# HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE, and ours).
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FPL_BENCH_OFFLINE")
PROBE_TIMEOUT_S = 3.0

_DIGEST_CHARS = 16


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from: exactly one place."""

    kind: Literal["tag", "file", "random", "embedded"]
    tag: str  # Backbone.tag: the open_clip tag, "checkpoint", "random" or "embedded"
    path: Path | None = None  # the weights file (tag: found in a cache or downloaded)
    tag_cfg: Mapping[str, Any] = field(default_factory=dict)  # open_clip's pretrained cfg


def weights_source(
    name: str, *, pretrained: str | Path | None, checkpoint: Path | None
) -> WeightsSource:
    """Decide where the weights of model `name` come from (see the module docstring); a tag's
    file is located here (cache, else download), so a missing file fails before any model is
    built. `checkpoint` is an alias of a `pretrained` path (give one of the two); with neither,
    only the embedded model has weights."""
    if pretrained is not None and checkpoint is not None:
        raise UsageError("give the weights once: --pretrained TAG|PATH (or --checkpoint PATH)")
    if checkpoint is not None:
        return _file_source(Path(checkpoint))
    if pretrained is None:
        if name == EMBEDDED:
            if not EMBEDDED_WEIGHTS.is_file():
                raise UsageError(
                    f"embedded weights {EMBEDDED_WEIGHTS} are missing; run `fpl-bench "
                    f"pretrain-tiny --out {EMBEDDED_WEIGHTS}` or pass --pretrained PATH"
                )
            return WeightsSource(kind="embedded", tag="embedded", path=EMBEDDED_WEIGHTS)
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = f"--pretrained TAG (known: {', '.join(tags)}), " if tags else ""
        raise UsageError(
            f"model {name} needs weights: pass {hint}--pretrained /path/to/weights.pt, "
            "or --pretrained none (random weights)"
        )
    text = str(pretrained)
    if text.strip().lower() == NO_WEIGHTS:
        return WeightsSource(kind="random", tag="random")
    if isinstance(pretrained, Path) or _looks_like_path(text):
        return _file_source(Path(text))
    cfg = _tag_cfg(name, text)
    tag = text.lower().replace("-", "_")  # open_clip's _clean_tag
    return WeightsSource(kind="tag", tag=tag, path=_tag_weights(name, tag, cfg), tag_cfg=cfg)


def why_not_a_file(path: Path) -> str:
    """The reason `path` is not a file, for a message: a folder, or nothing there."""
    return "is a folder; give the file in it" if path.is_dir() else "does not exist"


def _file_source(path: Path) -> WeightsSource:
    path = path.expanduser()
    if not path.is_file():
        raise UsageError(f"weights file {path} {why_not_a_file(path)}")
    return WeightsSource(kind="file", tag="checkpoint", path=path)


def _looks_like_path(text: str) -> bool:
    """A --pretrained value names a file (not a tag): it exists, or it has a path separator,
    a leading ~ or a weights suffix. open_clip's tags have none of these."""
    if "/" in text or os.sep in text or text.startswith("~"):
        return True
    return Path(text).suffix.lower() in WEIGHT_SUFFIXES or Path(text).is_file()


# ----------------------------------------------------------------------------- digests


def weights_digest(name: str, source: WeightsSource, *, quick_gelu: bool) -> str:
    """16 hex characters keying the feature cache: the sha256 prefix of the weights file; for
    random weights, of what fixes them (model `name`'s open_clip config, `RANDOM_INIT_SEED`,
    `quick_gelu`, the torch and open_clip versions). `name` must be registered with open_clip
    (`fpl_bench.backbone.resolve_model_name`)."""
    if source.path is not None:
        return file_digest(source.path)
    blob = json.dumps(
        {
            "random_init_seed": RANDOM_INIT_SEED,
            "config": open_clip.get_model_config(name),
            "quick_gelu": quick_gelu,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:_DIGEST_CHARS]


def file_digest(path: Path) -> str:
    """First 16 hex characters of the sha256 of a file (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:_DIGEST_CHARS]


# ----------------------------------------------------------------------------- tag weights


def _tag_cfg(name: str, tag: str) -> dict[str, Any]:
    if not open_clip.is_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags for {name}: {', '.join(tags)}" if tags else f"{name} has no tags"
        raise UsageError(
            f"unknown pretrained tag {tag!r}; {known}; or pass --pretrained /path/to/weights.pt "
            "or --pretrained none"
        )
    return dict(open_clip.get_pretrained_cfg(name, tag))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it, read from the environment
    at call time (HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME or ~/.cache)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def url_cache_dir() -> Path:
    """Where open_clip (and OpenAI's clip package) keep files downloaded from a URL."""
    return Path("~/.cache/clip").expanduser()


def _hub_files(cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(repo id, file names in open_clip's order of preference) of a tag's hub entry."""
    repo_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if not filename:
        return repo_id, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def _cached_tag_file(cfg: Mapping[str, Any]) -> Path | None:
    """The weights file of a tag if it is already on disk (no network), else None.

    Looks where open_clip.download_pretrained would put it: a 'file' entry; the hub cache
    (safetensors first) for an `hf_hub` entry; `~/.cache/clip/<basename>` for a `url` entry
    (open_clip prefers the hub when both exist; either copy on disk will do).
    """
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        return path if path.is_file() else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, names = _hub_files(cfg)
        for candidate in names:
            hit = try_to_load_from_cache(repo_id, candidate, cache_dir=str(hub_cache_dir()))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    if cfg.get("url"):
        local = url_cache_dir() / os.path.basename(cfg["url"])
        if local.is_file():
            return local
    return None


def _looked_for(cfg: Mapping[str, Any]) -> list[str]:
    """Where `_cached_tag_file` looked, for the error message."""
    places = []
    if cfg.get("file"):
        places.append(str(cfg["file"]))
    if cfg.get("hf_hub"):
        repo_id, names = _hub_files(cfg)
        folder = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "*"
        places.append(str(folder / names[0]))
    if cfg.get("url"):
        places.append(str(url_cache_dir() / os.path.basename(cfg["url"])))
    return places


def offline() -> bool:
    """Whether downloads are switched off by one of `OFFLINE_ENV`."""
    return any(
        os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on") for key in OFFLINE_ENV
    )


def _download_endpoint(cfg: Mapping[str, Any]) -> str:
    """The URL open_clip.download_pretrained would fetch from (it prefers the hub)."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return str(cfg.get("url", ""))


def _reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of `url` (or to the HTTPS proxy that would carry
    it) opens within `timeout` seconds: a cheap test before a download that could otherwise
    wait on the network, retry and warn for minutes."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if host is None:
        return False
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or host, proxy_parts.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tag_weights(name: str, tag: str, cfg: Mapping[str, Any]) -> Path:
    """The local weights file of `name:tag`: from a cache, else downloaded. Offline (or with
    the host unreachable) it fails at once with one line naming the files it looked for."""
    cached = _cached_tag_file(cfg)
    if cached is not None:
        return cached
    looked = " or ".join(_looked_for(cfg)) or "nowhere (open_clip gives no source)"
    suggestion = os.path.basename(cfg.get("url", "")) or "open_clip_model.safetensors"
    endpoint = _download_endpoint(cfg)
    if offline():
        reason = (
            "downloads are off (" + ", ".join(k for k in OFFLINE_ENV if os.environ.get(k)) + ")"
        )
    elif not endpoint or not _reachable(endpoint):
        reason = f"{urlsplit(endpoint).hostname or 'its host'} cannot be reached"
    else:
        return _download(name, tag, cfg, suggestion)
    raise UsageError(
        f"no weights for {name}:{tag} on disk (looked for {looked}) and {reason}; download "
        f"them elsewhere and pass --pretrained /path/to/{suggestion}"
    )


def _download(name: str, tag: str, cfg: Mapping[str, Any], suggestion: str) -> Path:
    try:
        fetched = open_clip.download_pretrained(dict(cfg))
    except Exception as e:  # any network/hub failure: the fix is the same for the user
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"could not fetch weights for {name}:{tag} ({first_line}); download them "
            f"elsewhere and pass --pretrained /path/to/{suggestion}"
        ) from e
    if not fetched:
        raise UsageError(
            f"open_clip has no source for {name}:{tag}; pass --pretrained /path/to/weights.pt"
        )
    return Path(fetched)
