"""Train the embedded tiny CLIP (`fpl-tiny-vit`) from scratch on synthetic images, on CPU.

    fpl-bench pretrain-tiny --out fpl_bench/assets/fpl-tiny-vit.pt

Data: each epoch draws `n_images` fresh images (`data/synthetic.generate`) with uniform random
classes and domains, from seeds derived from (seed + 10_000, epoch, domain): disjoint from the
seeds `load_synthetic` uses for its splits, so the zero-shot test images are never trained on.
Captions: "{template}" x classname, one random template per class per step (`TEMPLATES`).

Loss: CLIP's symmetric contrastive loss (Radford et al., ICML 2021, Fig. 3), with the text side of
a batch being one caption per class (64 texts) instead of one per image. A batch of 256 images
holds each class about 4 times, so CLIP's one-positive targets would push apart images and
captions of the same class; here every same-class pair is a positive:
    image -> text:  CE(scale * f_img @ f_txt.T, label)                    # [B, 64]
    text  -> image: CE(scale * f_txt @ f_img.T, uniform over same class)  # [64, B]
    loss = (image->text + text->image) / 2
AdamW (betas 0.9/0.98, weight decay 0.1 on matrices only), linear warmup then cosine decay,
learnable logit scale clamped at 100 as in CLIP. Saved as an fp16 state dict (atomic write).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.backbone import (
    EMBEDDED,
    Backbone,
    load_backbone,
    quiet_random_init,
    register_model_configs,
)
from fpl_bench.data.synthetic import CLASSNAMES, DOMAINS, generate, load_synthetic
from fpl_bench.io import write_atomic

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a {} on a background.",
    "a picture of a {}.",
    "a small {}.",
    "a big {}.",
    "the {}.",
    "a {} icon.",
    "{}",
    "a rendering of a {}.",
)
SEED_OFFSET = 10_000  # pretraining data seeds start here: disjoint from load_synthetic's
WARMUP_STEPS = 50


def zero_shot_accuracy(
    backbone: Backbone,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str],
    template: str = "a photo of a {}.",
) -> float:
    """Top-1 accuracy of argmax_c cos(image, text(template.format(classname_c))).

    images [N, H, W, 3] uint8, labels [N] ints indexing `classnames`.
    """
    text = backbone.encode_texts([template.format(c) for c in classnames])  # [C, D]
    pooled, _ = backbone.encode_images(images, with_tokens=False)  # [N, D]
    predicted = (pooled @ text.T).argmax(dim=1).numpy()
    return float(np.mean(predicted == np.asarray(labels)))


def _epoch_images(*, seed: int, epoch: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh images [n, 32, 32, 3] uint8 and labels [n] int64, domains mixed uniformly."""
    rng = np.random.default_rng([seed + SEED_OFFSET, epoch])
    labels = rng.integers(0, len(CLASSNAMES), size=n_images)
    domains = rng.integers(0, len(DOMAINS), size=n_images)
    images = np.empty((n_images, 32, 32, 3), dtype=np.uint8)
    for d, domain in enumerate(DOMAINS):
        idx = np.flatnonzero(domains == d)
        image_seed = int(
            np.random.SeedSequence([seed + SEED_OFFSET, epoch, d]).generate_state(1)[0]
        )
        images[idx] = generate(labels[idx], seed=image_seed, domain=domain)
    return images, labels.astype(np.int64)


def _normalise(images: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], as Backbone.encode_images' tensor path."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return x.sub_(mean).div_(std)


def _contrastive_loss(
    image_features: Tensor, class_text_features: Tensor, labels: Tensor, logit_scale: Tensor
) -> Tensor:
    """Symmetric CLIP loss with one text per class; same-class pairs are all positives.

    image_features [B, D], class_text_features [C, D] (both L2-normalised), labels [B].
    """
    logits = logit_scale * image_features @ class_text_features.T  # [B, C]
    image_to_text = F.cross_entropy(logits, labels)
    same = F.one_hot(labels, class_text_features.shape[0]).T.float()  # [C, B]
    present = same.sum(dim=1) > 0
    targets = same[present] / same[present].sum(dim=1, keepdim=True)
    text_to_image = F.cross_entropy(logits.T[present], targets)
    return (image_to_text + text_to_image) / 2


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms, embeddings of tokens/positions)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over WARMUP_STEPS, then cosine from `peak` to 0 at `total`."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def _save_fp16(model: torch.nn.Module, out: Path) -> None:
    """fp16 state dict, written atomically onto `out`."""
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    write_atomic(out, lambda tmp: torch.save(state, tmp))


def pretrain_tiny(
    *,
    out: Path,
    seed: int = 0,
    n_images: int = 40000,
    minutes: float | None = None,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    eval_per_class: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train fpl-tiny-vit from scratch and save it to `out`; return what was measured.

    `epochs` passes over `n_images` fresh images each fix the number of steps; `minutes`, if set,
    caps the training time: after the warmup the step count is cut to fit (the cosine schedule is
    set from that count, so the result then depends on the machine's speed).
    Returns {"zero_shot_accuracy": {domain: top-1 on load_synthetic's test split}, "seconds",
    "train_seconds", "steps", "images_seen", "final_loss", "out"}.
    """
    started = time.perf_counter()
    register_model_configs()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        torch.manual_seed(seed)
        with quiet_random_init():
            model = open_clip.create_model(EMBEDDED, pretrained=None)
        model.train()
        tokenizer = open_clip.get_tokenizer(EMBEDDED)
        caption_tokens = torch.stack(
            [tokenizer([t.format(c) for c in CLASSNAMES]) for t in TEMPLATES]
        )  # [n_templates, C, context]
        preprocess_cfg = model.visual.preprocess_cfg
        mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)

        optimizer = torch.optim.AdamW(
            _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
        )
        steps_per_epoch = n_images // batch_size
        total_steps = epochs * steps_per_epoch
        log(f"pretrain {EMBEDDED}: {epochs} epochs x {steps_per_epoch} steps of {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        step, loss_value, train_seconds = 0, float("nan"), 0.0
        budget = None if minutes is None else minutes * 60.0
        for epoch in range(epochs):
            if step >= total_steps:
                break
            images, labels = _epoch_images(seed=seed, epoch=epoch, n_images=n_images)
            order = torch.randperm(n_images, generator=generator).numpy()
            for batch_index in range(steps_per_epoch):
                if step >= total_steps:
                    break
                tick = time.perf_counter()
                idx = order[batch_index * batch_size : (batch_index + 1) * batch_size]
                x = _normalise(images[idx], mean, std)
                y = torch.from_numpy(labels[idx])
                pick = torch.randint(len(TEMPLATES), (len(CLASSNAMES),), generator=generator)
                texts = caption_tokens[pick, torch.arange(len(CLASSNAMES))]  # [C, context]
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total_steps, lr)

                image_features = F.normalize(model.encode_image(x), dim=-1)
                text_features = F.normalize(model.encode_text(texts), dim=-1)
                loss = _contrastive_loss(
                    image_features, text_features, y, model.logit_scale.exp().clamp(max=100)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                loss_value = loss.item()
                train_seconds += time.perf_counter() - tick

                if budget is not None and step == WARMUP_STEPS:
                    elapsed = time.perf_counter() - started
                    per_step = train_seconds / step
                    fit = step + int(max(0.0, budget - elapsed) / (per_step * 1.08))
                    if fit < total_steps:
                        log(f"  {minutes} min budget: {total_steps} -> {fit} steps")
                        total_steps = fit
                if step % 25 == 0 or step == total_steps:
                    log(
                        f"  epoch {epoch} step {step}/{total_steps} loss {loss_value:.3f} "
                        f"scale {model.logit_scale.exp().item():.1f} "
                        f"{time.perf_counter() - started:.0f}s"
                    )
        _save_fp16(model, out)
    finally:
        torch.set_num_threads(previous_threads)

    backbone = load_backbone(EMBEDDED, checkpoint=out)
    accuracy = {}
    for domain in DOMAINS:
        test = load_synthetic(
            n_train_per_class=0, n_val_per_class=0, n_test_per_class=eval_per_class, domain=domain
        ).test
        accuracy[domain] = zero_shot_accuracy(backbone, test.images, test.labels, CLASSNAMES)
        log(f"  zero-shot top-1 on {domain}: {accuracy[domain]:.3f}")
    return {
        "zero_shot_accuracy": accuracy,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "steps": step,
        "images_seen": step * batch_size,
        "final_loss": loss_value,
        "out": str(out),
    }
