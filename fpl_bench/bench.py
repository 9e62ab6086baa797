"""Speed of the federated loop (`fpl-bench bench`): seconds per round, client steps and samples
per second, peak memory, per method x eps x number of clients x backbone x compute config.

What is timed is training rounds only (no evaluation, no setup), after one warm-up local step,
on synthetic features of the backbone's dimensions (no images, no feature cache on disk): every
client holds `samples_per_client` examples of `classes_per_client` of the 32 seen classes
("{color} {shape}" names, as the embedded dataset). With DP on, sigma does not change the
compute, so eps only switches DP on (Poisson batches, per-sample clipping, noise).

Compute configs. `Config()` is everything this package does to be fast; each switch turned off
restores one piece of the reference implementations' compute pattern (docs/design.md, "Speed"):

    feature_cache    off: images go through the frozen image encoder at every step (CoOp)
    eot_truncation   off: the text tower runs the full context length (77 on CLIP)
    shared_prefix    off: every class runs SOS + context itself, through open_clip's modules
    vmap_per_sample  off: one forward + backward per sample for DP (`--per-sample-loop`)
    batch_clients    off: the step's clients one after another (`--sequential-clients`)
    bf16             off: fp32 even where bf16 is native (`--precision fp32`; on a CPU without
                     AMX the fast config is fp32 too, so this switch changes nothing there,
                     unless `--precision bf16` asks for bf16 anyway)
    hand_backward    off: the text tower's per-sample backward by autograd, vmapped over the
                     samples (`--autograd-backward`), instead of text_tower/backward.py (DP
                     only: a single backward uses autograd either way)

`compare_reference` measures the fast config, each switch off alone (its own contribution:
time with it off / time with everything on) and all switches off (the reference pattern), and
puts `speedup` = time of the config / time of the fast config into each record.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.backbone import EMBEDDED, Backbone, load_backbone
from fpl_bench.compute import Precision, busy_cores_elsewhere, fast_precision
from fpl_bench.data.partition import ClientSplit
from fpl_bench.data.synthetic import CLASSNAMES
from fpl_bench.driver import Compute, FeatureSet, FederatedRun, Federation, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.method import Method
from fpl_bench.protocols import base2novel
from fpl_bench.text_tower import TextTower
from fpl_bench.vision import VisionTower

BACKBONES = {"embedded": EMBEDDED, "vit-b-16": "ViT-B-16"}
MAX_ROUNDS = 10  # rounds timed at most per measurement (short rounds are repeated)
N_CLASSES = 64  # classes of the tower; the first half are seen (trained on), as base2novel
SWITCH_FLAGS = {
    "feature_cache": "--no-feature-cache",
    "eot_truncation": "--no-eot-truncation",
    "shared_prefix": "--no-shared-prefix",
    "vmap_per_sample": "--per-sample-loop",
    "batch_clients": "--sequential-clients",
    "bf16": "--precision fp32",
    "hand_backward": "--autograd-backward",
}


@dataclass(frozen=True)
class Config:
    """A compute configuration; each field True is one speed-up on (module docstring)."""

    feature_cache: bool = True
    eot_truncation: bool = True
    shared_prefix: bool = True
    vmap_per_sample: bool = True
    batch_clients: bool = True
    bf16: bool = True
    hand_backward: bool = True

    @property
    def label(self) -> str:
        """'fast', 'reference' (all off), or the flags of the switches that are off."""
        off = [SWITCH_FLAGS[f.name][2:] for f in fields(self) if not getattr(self, f.name)]
        if not off:
            return "fast"
        return "reference" if len(off) == len(SWITCH_FLAGS) else "+".join(off)

    def without(self, switch: str) -> Config:
        return replace(self, **{switch: False})


REFERENCE = Config(**dict.fromkeys(SWITCH_FLAGS, False))


@dataclass(frozen=True)
class Sizes:
    """The federation being timed (defaults: the embedded default's client size and step)."""

    samples_per_client: int = 64
    classes_per_client: int = 4
    batch_size: int = 32
    local_epochs: int = 2
    rounds: int = 1
    n_ctx: int = 16


@dataclass
class Record:
    """One measurement (what `--json` writes, one object per line of the list)."""

    method: str
    eps: float | None
    clients: int  # clients per round
    backbone: str
    config: str
    seconds_per_round: float
    samples_per_second: float
    client_steps_per_second: float
    peak_mem_bytes: int  # RSS high-water mark during the rounds (CUDA: max allocated)
    cpu_seconds_per_round: float
    rounds_timed: int  # the median over this many rounds is reported
    total_clients: int
    bytes_per_client: float  # params + momentum (+ anchor) held per client after the rounds
    device: str
    threads: int
    precision: str
    busy_cores_elsewhere: float  # other processes' load when the measurement started
    speedup: float | None = None  # seconds of this config / seconds of the fast config


# -- the federation ----------------------------------------------------------------------------


def bench_backbone(name: str, device: torch.device) -> Backbone:
    """The embedded tiny CLIP, or an open_clip architecture with random weights (no download)."""
    model = BACKBONES.get(name, name)
    if model == EMBEDDED:
        return load_backbone(EMBEDDED, device=str(device))
    return load_backbone(model, pretrained="none", device=str(device))


def synthetic_federation(
    n_clients: int,
    *,
    sizes: Sizes,
    dim: int,
    n_tokens: int,
    device: torch.device,
    seed: int = 0,
    pool: int = 8192,
    embedded: tuple[int, int] | None = None,
) -> Federation:
    """Clients of `sizes.samples_per_client` examples each from `sizes.classes_per_client` of
    the 32 seen classes (dealt round robin), drawn from a shared pool of at most `pool` random
    unit features [dim] (and patch tokens [n_tokens, dim] fp16 when n_tokens > 0; image-tower
    input tokens [*embedded] when given, for learners that prompt the image tower)."""
    gen = torch.Generator().manual_seed(seed)
    seen = N_CLASSES // 2
    per_class = max(1, min(pool // seen, n_clients * sizes.samples_per_client))
    labels = torch.arange(seen).repeat_interleave(per_class)  # [N]
    pooled = F.normalize(torch.randn(len(labels), dim, generator=gen), dim=-1)
    tokens = None
    if n_tokens:
        tokens = F.normalize(torch.randn(len(labels), n_tokens, dim, generator=gen), dim=-1)
        tokens = tokens.half().to(device)
    inputs = None
    if embedded is not None:
        inputs = torch.randn(len(labels), *embedded, generator=gen).to(device)
    features = FeatureSet(
        pooled=pooled.to(device), tokens=tokens, labels=labels.to(device), embedded=inputs
    )
    rng = np.random.default_rng(seed)
    train, classes = [], []
    for k in range(n_clients):
        mine = (k * sizes.classes_per_client + np.arange(sizes.classes_per_client)) % seen
        idx = np.flatnonzero(np.isin(labels.numpy(), mine))
        train.append(np.sort(rng.choice(idx, size=min(len(idx), sizes.samples_per_client))))
        classes.append(np.sort(mine))
    test = tuple(np.zeros(0, dtype=np.int64) for _ in range(n_clients))
    split = ClientSplit(train=tuple(train), test=test, classes=tuple(classes))
    protocol = base2novel(np.arange(seen), np.arange(seen, N_CLASSES), test_labels=labels.numpy())
    return Federation(train=features, test=features, split=split, protocol=protocol)


@dataclass(frozen=True)
class EncodedEachStep:
    """Training features computed from images at every `take` (the `feature_cache` switch
    off): images [N, H, W, 3] uint8 through the frozen image encoder, as CoOp's trainer does."""

    images: np.ndarray
    labels: Tensor
    backbone: Backbone
    with_tokens: bool

    def take(self, idx: Tensor, *, embedded: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        if embedded:
            raise UsageError(
                "--no-feature-cache does not cover learners that prompt the image tower"
            )
        rows = self.images[idx.cpu().numpy()]
        pooled, tokens = self.backbone.encode_images(rows, with_tokens=self.with_tokens)
        device = self.labels.device
        tokens_out = tokens.float().to(device) if self.with_tokens else None
        return pooled.to(device), tokens_out, self.labels[idx]


def without_feature_cache(fed: Federation, backbone: Backbone, *, seed: int = 0) -> Federation:
    """`fed` whose training features are encoded from random images at every step."""
    size = tuple(backbone.preprocess_cfg["size"])
    n = len(fed.train.labels)
    images = np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)
    live = EncodedEachStep(images, fed.train.labels, backbone, fed.train.tokens is not None)
    return replace(fed, train=live)  # type: ignore[arg-type]


# -- one measurement ------------------------------------------------------------------------------


def _state_bytes(run: FederatedRun) -> float:
    """Mean bytes of the tensors each client holds (params, momentum, anchor)."""
    total = 0
    for state in run.clients:
        for part in (state.params, state.momentum, state.anchor):
            total += sum(t.numel() * t.element_size() for t in part.values())
    return total / max(1, len(run.clients))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets VmHWM, the RSS peak
        Path("/proc/self/clear_refs").write_text("5")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_run(
    method: Method,
    backbone: Backbone,
    *,
    clients: int,
    total_clients: int,
    eps: float | None,
    config: Config,
    sizes: Sizes,
    device: torch.device,
    precision: Precision | None = None,
) -> FederatedRun:
    """A FederatedRun of `method` on a synthetic federation under `config`; `precision` is
    that of a config whose bf16 switch is on (default: the device's fast precision)."""
    tower = TextTower.build(
        backbone.model,
        backbone.tokenizer,
        CLASSNAMES[:N_CLASSES],
        n_ctx=sizes.n_ctx,
        truncate=config.eot_truncation,
        share_prefix=config.shared_prefix,
        precision=(precision or fast_precision(device)) if config.bf16 else "fp32",
    ).with_options(hand_backward=config.hand_backward)
    n_tokens = backbone.n_patches if method.needs_tokens else 0
    vision = VisionTower.of(backbone.model) if method.prompts_image_tower else None
    fed = synthetic_federation(
        total_clients,
        sizes=sizes,
        dim=backbone.embed_dim,
        n_tokens=n_tokens,
        device=device,
        embedded=None if vision is None else (1 + backbone.n_patches, vision.width),
    )
    if not config.feature_cache:
        fed = without_feature_cache(fed, backbone)
    schedule = Schedule(
        rounds=1 + max(sizes.rounds, MAX_ROUNDS),
        local_epochs=sizes.local_epochs,
        batch_size=sizes.batch_size,
        client_fraction=clients / total_clients,
    )
    compute = Compute(
        batch_clients=config.batch_clients, per_sample_loop=not config.vmap_per_sample
    )
    run = FederatedRun(
        method, tower, fed, schedule=schedule, seed=0, compute=compute, vision=vision
    )
    if eps is not None:
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    return run


def measure(
    method: Method,
    backbone: Backbone,
    *,
    backbone_label: str,
    clients: int,
    eps: float | None,
    config: Config,
    sizes: Sizes = Sizes(),
    total_clients: int | None = None,
    device: torch.device,
    min_seconds: float = 1.0,
    precision: Precision | None = None,
) -> Record:
    """Median time of a training round of `clients` clients, after one warm-up step, over
    `sizes.rounds` rounds or more until `min_seconds` are spent (at most MAX_ROUNDS)."""
    total = total_clients or clients
    run = build_run(
        method,
        backbone,
        clients=clients,
        total_clients=total,
        eps=eps,
        config=config,
        sizes=sizes,
        device=device,
        precision=precision,
    )
    busy = busy_cores_elsewhere()
    first = run.rounds_schedule[0][0]
    run.local_gradients(first, 0, 0, torch.arange(min(sizes.batch_size, run.n_train[first])))
    _reset_peak(device)
    walls: list[float] = []
    cpus: list[float] = []
    rnd = 0
    while rnd < sizes.rounds or (sum(walls) < min_seconds and rnd < MAX_ROUNDS):
        rnd += 1
        cpu0, t0 = time.process_time(), time.perf_counter()
        run.run_round(rnd)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - cpu0)
    steps = samples = 0.0
    for c in run.rounds_schedule[1]:  # every round samples as many clients
        steps += run.steps[c]
        if run.private:  # Poisson batches: expected size q n per step
            samples += run.steps[c] * run.expected_batch(c)
        else:
            samples += sizes.local_epochs * run.n_train[c]
    wall = float(np.median(walls))
    return Record(
        method=method.label,
        eps=eps,
        clients=clients,
        backbone=backbone_label,
        config=config.label,
        seconds_per_round=wall,
        samples_per_second=samples / wall,
        client_steps_per_second=steps / wall,
        peak_mem_bytes=_peak(device),
        cpu_seconds_per_round=float(np.median(cpus)),
        rounds_timed=len(walls),
        total_clients=total,
        bytes_per_client=_state_bytes(run),
        device=str(device),
        threads=torch.get_num_threads(),
        precision=run.tower.precision,
        busy_cores_elsewhere=round(busy, 2),
    )


# -- sweeps and tables --------------------------------------------------------------------------


def reference_configs(*, private: bool = True, bf16_native: bool = True) -> list[Config]:
    """fast, each switch off alone, all off; without the switches that change nothing here
    (the per-sample loop and backward without DP, fp32 where the fast config is fp32 already)."""
    fast = Config()
    idle = {s: False for s in SWITCH_FLAGS}
    idle.update(vmap_per_sample=not private, hand_backward=not private, bf16=not bf16_native)
    return [fast, *(fast.without(s) for s in SWITCH_FLAGS if not idle[s]), REFERENCE]


def with_speedups(records: Sequence[Record]) -> list[Record]:
    """Each record with speedup = its seconds per round / those of the fast config of the same
    (method, eps, clients, backbone)."""
    fast = {
        (r.method, r.eps, r.clients, r.backbone): r.seconds_per_round
        for r in records
        if r.config == "fast"
    }
    out = []
    for r in records:
        base = fast.get((r.method, r.eps, r.clients, r.backbone))
        out.append(replace(r, speedup=r.seconds_per_round / base if base else None))
    return out


def contributions(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Rows (method, eps, clients, backbone, <switch flag>: ratio, ..., all: ratio) from records
    that carry speedups."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r.method, r.eps, r.clients, r.backbone)
        row = rows.setdefault(
            key, {"method": r.method, "eps": r.eps, "clients": r.clients, "backbone": r.backbone}
        )
        if r.config == "fast":
            row["fast s/round"] = r.seconds_per_round
        elif r.config == "reference":
            row["all off"] = r.speedup
        else:
            row[r.config] = r.speedup
    return list(rows.values())


def format_records(records: Sequence[Record]) -> str:
    """A fixed-width table of the records."""
    head = (
        f"{'backbone':<9} {'method':<10} {'eps':>5} {'clients':>7} {'config':<24} "
        f"{'s/round':>9} {'steps/s':>8} {'samples/s':>10} {'peak MiB':>9} {'B/client':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        eps = "none" if r.eps is None else f"{r.eps:g}"
        lines.append(
            f"{r.backbone:<9} {r.method:<10} {eps:>5} {r.clients:>7} {r.config:<24} "
            f"{r.seconds_per_round:>9.3f} {r.client_steps_per_second:>8.1f} "
            f"{r.samples_per_second:>10.0f} {r.peak_mem_bytes / 2**20:>9.0f} "
            f"{r.bytes_per_client:>9.0f}"
        )
    return "\n".join(lines)


def format_contributions(rows: Sequence[dict[str, Any]]) -> str:
    """Per method and eps: each switch's own slowdown when turned off, and all off / all on."""
    switches = [flag[2:] for flag in SWITCH_FLAGS.values()]  # missing: changes nothing here
    head = f"{'method':<10} {'eps':>5} {'fast s/rnd':>10} " + " ".join(
        f"{s:>18}" for s in [*switches, "all off"]
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        eps = "none" if row["eps"] is None else f"{row['eps']:g}"
        cells = [row.get(s) for s in [*switches, "all off"]]
        shown = " ".join(f"{'n/a' if c is None else f'{c:.2f}x':>18}" for c in cells)
        fast = row.get("fast s/round", math.nan)
        lines.append(f"{row['method']:<10} {eps:>5} {fast:>10.3f} {shown}")
    return "\n".join(lines)


def write_json(records: Sequence[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], indent=1))


def run_bench(
    methods: Sequence[Method],
    *,
    backbones: Sequence[str],
    eps_list: Sequence[float | None],
    client_counts: Sequence[int],
    configs: Sequence[Config] | Callable[[float | None], Sequence[Config]],
    sizes: Sizes,
    device: torch.device,
    total_clients: int | None = None,
    log: Callable[[str], None] = print,
    precision: Precision | None = None,
) -> list[Record]:
    """Every backbone x method x eps x clients x config (a list, or a function of eps); logs
    each record as it is measured. `precision`: as in `build_run`."""
    records: list[Record] = []
    for name in backbones:
        backbone = bench_backbone(name, device)
        for method in methods:
            for eps in eps_list:
                chosen = configs(eps) if callable(configs) else configs
                for clients in client_counts:
                    for config in chosen:
                        if not method.trains:
                            continue
                        record = measure(
                            method,
                            backbone,
                            backbone_label=name,
                            clients=clients,
                            eps=eps,
                            config=config,
                            sizes=sizes,
                            total_clients=total_clients,
                            device=device,
                            precision=precision,
                        )
                        records.append(record)
                        log(format_records([record]).splitlines()[-1])
    return records
