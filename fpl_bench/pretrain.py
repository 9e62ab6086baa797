"""Train the embedded tiny CLIP (`fpl-tiny-vit`) from scratch on synthetic images, on CPU.

    fpl-bench pretrain-tiny --out fpl_bench/assets/fpl-tiny-vit.pt

Two phases, one training loop (`_train`):

1. *Contrastive pretraining* from a seeded random init (`epochs` x `n_images` // `batch_size`
   steps, peak lr 2e-3): CLIP's loss on the pooled (CLS) feature only.
2. *Patch alignment* (`patch_steps` steps, peak lr `patch_lr`), starting from phase 1's weights
   rounded to fp16 (exactly what loading phase 1's saved checkpoint gives): the same pooled loss
   plus a patch-level term, so that the projected patch tokens carry the text alignment that
   FedOTP scores (a model trained on the pooled feature alone leaves them unaligned: mean-patch
   zero-shot 5%). Pooling stays CLS, as in ViT-B/16.

`finetune_patches(init=..., out=...)` runs phase 2 alone from a checkpoint, so
`pretrain_tiny(out=o, seed=s)` equals phase 1 saved to p then `finetune_patches(init=p, out=o,
seed=s)` (same weights on one machine with the same thread count; `phase1_out` keeps p).

The shipped `fpl_bench/assets/fpl-tiny-vit.pt` (sha256 89b086ad8288...) is the output of

    fpl-bench pretrain-tiny --out fpl_bench/assets/fpl-tiny-vit.pt --threads 1

i.e. `pretrain_tiny(out=..., threads=1)` with every other argument at its default (seed 0;
1872 + 300 steps of 128 images; 17 min 48 s on one thread of a 2-core AMD EPYC Zen 3 VM, AVX2,
with the other core busy). Rerun there, it gave every tensor bit for bit, and so the same file
(`save_state` makes the bytes independent of the path). With the default thread count (all
cores) float sums differ in the last bits (measured: 8e-7 after 3 steps), so it reproduces the
recipe and the accuracy, not every bit. Its measured zero-shot top-1 ("a photo of a {}.", `evaluate_checkpoint`, also
`fpl-bench pretrain-tiny --out FILE --measure`: 2048 test images per domain, chance 1.6%):

    domain    pooled   mean-patch
    plain     72.4%    68.8%
    noise     63.1%    59.3%
    stripes   71.9%    67.8%
    checker   68.5%    67.1%
    dusk      42.7%    34.9%      (65.7% pooled with "a photo of a {} at dusk.")

Dusk, the embedded default's downstream domain, is 12% of the pretraining images and always
captioned with its light: the model knows dusk (65.7% when the caption says so), the
hand-written prompt does not ask for it (42.7%). That gap is the headroom a learned prompt can
close (README, "Results on the embedded default").

Data: each epoch draws `n_images` fresh images (`data/synthetic.generate`) with uniform random
classes; each image is of the dusk domain with probability `dusk_fraction` (default
DUSK_FRACTION = 12%), else of a daylight domain drawn uniformly. Seeds derive from (seed +
10_000, phase, epoch, domain): disjoint from the seeds `load_synthetic` uses for its splits, so
the zero-shot test images are never trained on, and disjoint between the phases. Classes are
drawn and captioned in sorted-name order (`_training_classnames`) and mapped to `CLASSNAMES` ids
only to render the pixels, so training does not depend on the order of the class ids.
Captions: a daylight image takes "{template}" x classname with one of the 12 `TEMPLATES`, none
of which names the light; a dusk image one of the 6 `DUSK_TEMPLATES` ("a {} at dusk.", "a dim
photo of a {}.", ...), as web captions name what is unusual about a photo. One random template
per class per step on each side, so a step's text side is 2 x 64 captions (daylight, dusk).

Loss on the pooled feature: CLIP's symmetric contrastive loss (Radford et al., ICML 2021,
Fig. 3), with the text side of a batch being one caption per class and light (128 texts)
instead of one per image. A batch holds each class about twice, so CLIP's one-positive targets
would push apart images and captions of the same class; here every same-caption-id pair is a
positive (caption id = class + 64 x is_dusk):
    image -> text:  CE(scale * f_img @ f_txt.T, caption id)               # [B, 128]
    text  -> image: CE(scale * f_txt @ f_img.T, uniform over same id)     # [captions present, B]
    pooled loss = (image->text + text->image) / 2
Patch term (phase 2), on the patch tokens exactly as `Backbone.encode_images` makes them for the
feature cache (tokens after `ln_post`, projected by `visual.proj`, L2-normalised):
    patch logits = scale * mean_m cos(token_m, f_txt)                     # [B, 128]
    loss = pooled loss + patch_weight * CE(patch logits, caption id)
so the average patch token must point at its class's caption, which is FedOTP's logit with
identical prompts and top_percent 1 (fpl_bench/learners/ot.py, the learner of FedOTP).
AdamW (betas 0.9/0.98, weight decay 0.1 on matrices only), linear warmup then cosine decay,
learnable logit scale clamped at 100 as in CLIP. Saved as an fp16 state dict (atomic write).
"""

from __future__ import annotations

import functools
import io
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    visual_features,
)
from fpl_bench.data.synthetic import CLASSNAMES, DAYLIGHT, DOMAINS, generate, load_synthetic
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
# Captions of dusk images: they name the light, as web captions of an unusual photo do.
DUSK_TEMPLATES: tuple[str, ...] = (
    "a photo of a {} at dusk.",
    "a {} at dusk.",
    "a dim photo of a {}.",
    "a {} in the evening light.",
    "a dark picture of a {}.",
    "a {} in violet light.",
)
DUSK_FRACTION = 0.12  # share of dusk images in the pretraining corpus (the rest: daylight)
SEED_OFFSET = 10_000  # pretraining data seeds start here: disjoint from load_synthetic's
WARMUP_STEPS = 50
BATCH_SIZE = 128  # images per step (`pretrain_tiny`'s default): also the fewest n_images it takes
PHASE_PRETRAIN, PHASE_PATCHES = 1, 2  # key of each phase's data and shuffling streams
LogFn = Callable[[str], None]


# ----------------------------------------------------------------------------- measurement


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


def patch_zero_shot_accuracy(
    backbone: Backbone,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str],
    template: str = "a photo of a {}.",
) -> float:
    """Top-1 accuracy of argmax_c mean_m cos(patch_token_m, text(template.format(classname_c))).

    The patch tokens are those FedOTP scores (`Backbone.encode_images`: projected, L2-normalised
    tokens after ln_post); the pooled feature is not used. images [N, H, W, 3] uint8, labels [N].
    """
    text = backbone.encode_texts([template.format(c) for c in classnames])  # [C, D]
    _, tokens = backbone.encode_images(images, with_tokens=True)  # [N, P, D] fp16, unit rows
    # mean_m cos(x_m, t) = (mean_m x_m) . t for unit-norm x_m and t
    predicted = (tokens.float().mean(dim=1) @ text.T).argmax(dim=1).numpy()
    return float(np.mean(predicted == np.asarray(labels)))


def _measure(out: str | Path, eval_per_class: int, log: LogFn) -> dict[str, Any]:
    """`evaluate_checkpoint` of the written file, or nothing when `eval_per_class` is 0."""
    if not eval_per_class:
        return {}
    return evaluate_checkpoint(Path(out), n_per_class=eval_per_class, log=log)


def evaluate_checkpoint(
    checkpoint: Path, *, n_per_class: int = 32, log: LogFn = print
) -> dict[str, dict[str, float]]:
    """Pooled and mean-patch zero-shot top-1 ("a photo of a {}.") of a fpl-tiny-vit checkpoint on
    `load_synthetic`'s test split of each domain (`n_per_class` x 64 images, never trained on),
    and, on dusk, pooled top-1 with a caption that names the light ("a photo of a {} at dusk.",
    one of `DUSK_TEMPLATES`): what the model knows that the hand-written prompt does not reach.

    Returns {"zero_shot_accuracy": {domain: acc}, "patch_zero_shot_accuracy": {domain: acc},
    "dusk_caption_accuracy": {"dusk": acc}}.
    """
    backbone = load_backbone(EMBEDDED, checkpoint=checkpoint)
    pooled, patches, captioned = {}, {}, {}
    for domain in DOMAINS:
        test = load_synthetic(
            n_train_per_class=0, n_val_per_class=0, n_test_per_class=n_per_class, domain=domain
        ).test
        pooled[domain] = zero_shot_accuracy(backbone, test.images, test.labels, CLASSNAMES)
        patches[domain] = patch_zero_shot_accuracy(backbone, test.images, test.labels, CLASSNAMES)
        log(
            f"  zero-shot on {domain}: pooled {pooled[domain]:.3f}, mean-patch {patches[domain]:.3f}"
        )
        if domain == "dusk":
            captioned[domain] = zero_shot_accuracy(
                backbone, test.images, test.labels, CLASSNAMES, DUSK_TEMPLATES[0]
            )
            log(f"  zero-shot on dusk with {DUSK_TEMPLATES[0]!r}: pooled {captioned[domain]:.3f}")
    return {
        "zero_shot_accuracy": pooled,
        "patch_zero_shot_accuracy": patches,
        "dusk_caption_accuracy": captioned,
    }


# ----------------------------------------------------------------------------- pieces


def _training_classnames() -> tuple[tuple[str, ...], np.ndarray]:
    """Class names in sorted order and, for each, its id in `CLASSNAMES` ([C] int64)."""
    names = tuple(sorted(CLASSNAMES))
    return names, np.array([CLASSNAMES.index(n) for n in names], dtype=np.int64)


@functools.cache
def _caption_tokens(templates: tuple[str, ...]) -> Tensor:
    """Token ids [n_templates, C, context] of every template x training class name."""
    names, _ = _training_classnames()
    tokenizer = open_clip.get_tokenizer(EMBEDDED)
    return torch.stack([tokenizer([t.format(c) for c in names]) for t in templates])


def _epoch_images(
    *, seed: int, phase: int, epoch: int, n_images: int, dusk_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh images [n, 32, 32, 3] uint8 and caption ids [n] int64.

    Each image is dusk with probability `dusk_fraction`, else of a daylight domain drawn
    uniformly. Caption id = class + C * is_dusk, the class indexing `_training_classnames()`
    (sorted names), not `CLASSNAMES`: ids below C take a daylight caption, the rest a dusk one.
    """
    _, to_id = _training_classnames()
    rng = np.random.default_rng([seed + SEED_OFFSET, phase, epoch])
    labels = rng.integers(0, len(to_id), size=n_images)
    domains = rng.integers(0, len(DAYLIGHT), size=n_images)
    dusk = rng.random(n_images) < dusk_fraction
    domains[dusk] = DOMAINS.index("dusk")
    images = np.empty((n_images, 32, 32, 3), dtype=np.uint8)
    for d, domain in enumerate(DOMAINS):
        idx = np.flatnonzero(domains == d)
        image_seed = int(
            np.random.SeedSequence([seed + SEED_OFFSET, phase, epoch, d]).generate_state(1)[0]
        )
        images[idx] = generate(to_id[labels[idx]], seed=image_seed, domain=domain)
    return images, (labels + len(to_id) * dusk).astype(np.int64)


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


def _patch_loss(
    patch_features: Tensor, class_text_features: Tensor, labels: Tensor, logit_scale: Tensor
) -> Tensor:
    """CE on scale * mean_m cos(patch_m, text_c): patch_features [B, P, D] and
    class_text_features [C, D] L2-normalised, labels [B]."""
    # mean_m cos(x_m, t) = (mean_m x_m) . t for unit-norm rows
    logits = logit_scale * patch_features.mean(dim=1) @ class_text_features.T  # [B, C]
    return F.cross_entropy(logits, labels)


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


def _fp16_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}


def save_state(state: dict[str, Tensor], out: Path) -> None:
    """`torch.save(state)` written atomically onto `out`, its bytes independent of the path.

    torch.save names the archive's root folder after the file it writes (here a random
    temporary name), so equal tensors would give different bytes; serialising into memory first
    names it "archive" always, and equal weights give an equal sha256.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(out, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _save_fp16(model: torch.nn.Module, out: Path) -> None:
    """fp16 state dict, written atomically onto `out`."""
    save_state(_fp16_state(model), out)


def _new_model() -> torch.nn.Module:
    register_model_configs()
    with quiet_random_init():
        return open_clip.create_model(EMBEDDED, pretrained=None)


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """torch intra-op threads for the block (None: all cores), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- training loop


def _train(
    model: torch.nn.Module,
    *,
    seed: int,
    phase: int,
    n_images: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patch_weight: float,
    minutes: float | None,
    dusk_fraction: float,
    log: LogFn,
) -> dict[str, Any]:
    """`steps` AdamW steps on fresh images of stream (seed, phase), `n_images` per epoch.

    `minutes`, if set, caps this phase's time: after the warmup the step count is cut to fit
    (the cosine schedule is then set from that count). Returns {"steps", "train_seconds",
    "final_loss", "final_patch_loss"}.
    """
    started = time.perf_counter()
    model.train()
    daylight_tokens = _caption_tokens(TEMPLATES)  # [n_templates, C, context]
    dusk_tokens = _caption_tokens(DUSK_TEMPLATES)
    n_classes = daylight_tokens.shape[1]
    classes = torch.arange(n_classes)
    preprocess_cfg = model.visual.preprocess_cfg
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)

    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )
    steps_per_epoch = n_images // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"n_images {n_images} < batch_size {batch_size}")
    total_steps = steps
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, phase]).generate_state(1)[0])
    )
    step, loss_value, patch_value, train_seconds = 0, float("nan"), float("nan"), 0.0
    budget = None if minutes is None else minutes * 60.0
    epoch = 0
    while step < total_steps:
        images, labels = _epoch_images(
            seed=seed, phase=phase, epoch=epoch, n_images=n_images, dusk_fraction=dusk_fraction
        )
        order = torch.randperm(n_images, generator=generator).numpy()
        for batch_index in range(steps_per_epoch):
            if step >= total_steps:
                break
            tick = time.perf_counter()
            idx = order[batch_index * batch_size : (batch_index + 1) * batch_size]
            x = _normalise(images[idx], mean, std)
            y = torch.from_numpy(labels[idx])
            pick = torch.randint(len(TEMPLATES), (n_classes,), generator=generator)
            pick_dusk = torch.randint(len(DUSK_TEMPLATES), (n_classes,), generator=generator)
            texts = torch.cat(
                [daylight_tokens[pick, classes], dusk_tokens[pick_dusk, classes]]
            )  # [2C, context]: one daylight and one dusk caption per class
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, lr)

            scale = model.logit_scale.exp().clamp(max=100)
            text_features = F.normalize(model.encode_text(texts), dim=-1)
            if patch_weight:
                pooled, tokens = visual_features(model, x)
                image_features = F.normalize(pooled, dim=-1)
                patch_loss = _patch_loss(F.normalize(tokens, dim=-1), text_features, y, scale)
            else:
                image_features = F.normalize(model.encode_image(x), dim=-1)
                patch_loss = torch.zeros(())
            loss = _contrastive_loss(image_features, text_features, y, scale)
            total = loss + patch_weight * patch_loss if patch_weight else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            loss_value, patch_value = loss.item(), patch_loss.item()
            train_seconds += time.perf_counter() - tick

            if budget is not None and step == WARMUP_STEPS:
                per_step = train_seconds / step
                elapsed = time.perf_counter() - started
                fit = step + int(max(0.0, budget - elapsed) / (per_step * 1.08))
                if fit < total_steps:
                    log(f"  {minutes} min budget: {total_steps} -> {fit} steps")
                    total_steps = fit
            if step % 25 == 0 or step == total_steps:
                patch_part = f" patch {patch_value:.3f}" if patch_weight else ""
                log(
                    f"  phase {phase} epoch {epoch} step {step}/{total_steps} "
                    f"loss {loss_value:.3f}{patch_part} "
                    f"scale {model.logit_scale.exp().item():.1f} "
                    f"{time.perf_counter() - started:.0f}s"
                )
        epoch += 1
    return {
        "steps": step,
        "train_seconds": train_seconds,
        "final_loss": loss_value,
        "final_patch_loss": patch_value,
    }


def _patch_phase(
    model: torch.nn.Module,
    *,
    seed: int,
    steps: int,
    n_images: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patch_weight: float,
    dusk_fraction: float,
    log: LogFn,
) -> dict[str, Any]:
    log(f"patch alignment {EMBEDDED}: {steps} steps of {batch_size}, peak lr {lr}")
    return _train(
        model,
        seed=seed,
        phase=PHASE_PATCHES,
        n_images=n_images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patch_weight=patch_weight,
        minutes=None,
        dusk_fraction=dusk_fraction,
        log=log,
    )


# ----------------------------------------------------------------------------- entry points


def pretrain_tiny(
    *,
    out: Path,
    seed: int = 0,
    n_images: int = 40000,
    minutes: float | None = None,
    epochs: int = 6,
    batch_size: int = BATCH_SIZE,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    patch_steps: int = 300,
    patch_n_images: int = 20000,
    patch_lr: float = 5e-4,
    patch_weight: float = 1.0,
    dusk_fraction: float = DUSK_FRACTION,
    eval_per_class: int = 32,
    threads: int | None = None,
    phase1_out: Path | None = None,
    log: LogFn = print,
) -> dict[str, Any]:
    """Train fpl-tiny-vit from scratch (phase 1, then phase 2) and save it to `out`.

    Phase 1: `epochs` passes over `n_images` fresh images; `minutes`, if set, caps phase 1's
    time (the step count is cut after the warmup, so the result then depends on the machine's
    speed). Phase 2: `finetune_patches` with `patch_*` from phase 1's weights rounded to fp16
    (saved to `phase1_out` if given). `threads`: torch threads (None: all cores).
    Returns {"zero_shot_accuracy": {domain: pooled top-1 on load_synthetic's test split},
    "patch_zero_shot_accuracy": {domain: mean-patch top-1} (both absent with `eval_per_class`
    0, see `evaluate_checkpoint`), "seconds", "train_seconds",
    "steps", "phase1_steps", "phase2_steps", "images_seen", "final_loss", "final_patch_loss",
    "out"}.
    """
    started = time.perf_counter()
    with _num_threads(threads):
        torch.manual_seed(seed)
        model = _new_model()
        steps_per_epoch = n_images // batch_size
        log(f"pretrain {EMBEDDED}: {epochs} epochs x {steps_per_epoch} steps of {batch_size}")
        phase1 = _train(
            model,
            seed=seed,
            phase=PHASE_PRETRAIN,
            n_images=n_images,
            steps=epochs * steps_per_epoch,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            patch_weight=0.0,
            minutes=minutes,
            dusk_fraction=dusk_fraction,
            log=log,
        )
        state = _fp16_state(model)
        if phase1_out is not None:
            save_state(state, Path(phase1_out))
        model.load_state_dict(state)  # phase 2 starts where loading the phase-1 file would
        phase2 = _patch_phase(
            model,
            seed=seed,
            steps=patch_steps,
            n_images=patch_n_images,
            batch_size=batch_size,
            lr=patch_lr,
            weight_decay=weight_decay,
            patch_weight=patch_weight,
            dusk_fraction=dusk_fraction,
            log=log,
        )
        _save_fp16(model, out)
    measured = _measure(out, eval_per_class, log)
    steps = phase1["steps"] + phase2["steps"]
    return {
        **measured,
        "seconds": time.perf_counter() - started,
        "train_seconds": phase1["train_seconds"] + phase2["train_seconds"],
        "steps": steps,
        "phase1_steps": phase1["steps"],
        "phase2_steps": phase2["steps"],
        "images_seen": steps * batch_size,
        "final_loss": phase2["final_loss"],
        "final_patch_loss": phase2["final_patch_loss"],
        "out": str(out),
    }


def finetune_patches(
    *,
    init: Path,
    out: Path,
    seed: int = 0,
    steps: int = 300,
    n_images: int = 20000,
    batch_size: int = 128,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    patch_weight: float = 1.0,
    dusk_fraction: float = DUSK_FRACTION,
    eval_per_class: int = 32,
    threads: int | None = None,
    log: LogFn = print,
) -> dict[str, Any]:
    """Phase 2 alone: fine-tune the fpl-tiny-vit checkpoint `init` with the patch-alignment term.

    Writes an fp16 state dict to `out`. With `eval_per_class` 0 nothing is measured.
    Returns {"zero_shot_accuracy", "patch_zero_shot_accuracy" (as `evaluate_checkpoint`; absent
    without evaluation), "seconds", "train_seconds", "steps", "final_loss", "final_patch_loss",
    "out"}.
    """
    started = time.perf_counter()
    with _num_threads(threads):
        model = _new_model()
        model.load_state_dict(load_backbone(EMBEDDED, checkpoint=Path(init)).model.state_dict())
        model.requires_grad_(True)
        trained = _patch_phase(
            model,
            seed=seed,
            steps=steps,
            n_images=n_images,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            patch_weight=patch_weight,
            dusk_fraction=dusk_fraction,
            log=log,
        )
        _save_fp16(model, out)
    measured = _measure(out, eval_per_class, log)
    return {**measured, **trained, "seconds": time.perf_counter() - started, "out": str(out)}
