"""The frozen text tower of an open_clip CLIP, with learnable context vectors in its prompts.

CoOp (Zhou et al., IJCV 2022, arXiv:2109.01134; reference KaiyangZhou/CoOp `trainers/coop.py`)
replaces the hand-written words of "a photo of a {class}." by n_ctx learnable vectors:

    prompt_c = [SOS] [V]_1 ... [V]_n_ctx [CLASS_c tokens] [.] [EOT] [pad ...]

The sequence runs through the frozen `transformer`, `ln_final` and `text_projection`, and the
feature of class c is the output at its EOT position.

Truncation (exact): open_clip's text transformer is causal (`attn_mask` is upper-triangular
-inf), so the output at position t depends only on tokens <= t. Every token after the longest EOT
position among the prompts is therefore irrelevant to every pooled feature, and the tower runs
on the first `max(eot) + 1` positions only. `tests/test_prompt.py` checks equality with the full
length.

Shared prefix (exact, the default where the tower allows it): SOS and the context vectors are
the same for every class, so `encode` runs them once per prompt and only the class-specific
positions per class (shared_prefix.py). Any other tower runs through its own modules
(`share_prefix=False` forces that, the reference compute pattern).

Backward: for per-sample gradients (under `compute.per_sample_backward`, which
privacy/per_sample.py sets) the shared-prefix path is one autograd node whose backward is written
out and batched over the samples' cotangents (backward.py; equal to autograd's to rounding);
otherwise, and with `hand_backward=False`, autograd runs through the forward's ops.

Precision: `precision="bf16"` runs the frozen tower under bf16 autocast (matmuls in bf16, the
residual stream, layer norms, softmax and the returned features in fp32); `"fp32"` is exact
float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fpl_bench.compute import Precision, per_sample_backward_ahead, wide
from fpl_bench.errors import UsageError
from fpl_bench.text_tower import backward, shared_prefix
from fpl_bench.text_tower.shared_prefix import causal_mask, supports_fast_blocks

# Attention kernels under bf16 autocast: the fused one first (see TextTower.autocast).
_BF16_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PLACEHOLDER = "X"  # the word each context slot holds when the prompts are tokenised


def _text_module(model: nn.Module) -> nn.Module:
    """The module that owns the text tower: `CLIP` itself or `CustomTextCLIP.text`."""
    text = getattr(model, "text", None)
    return text if isinstance(text, nn.Module) else model


@dataclass(eq=False)
class TextTower:
    """Frozen text tower that takes context vectors in place of prompt words.

    Holds, for each class, the token embeddings around the context slots, cut to the truncated
    length `seq_len`:
        prefix  [n_cls, 1, W]                  the SOS embedding
        suffix  [n_cls, seq_len - 1 - n_ctx, W] class-name tokens, '.', EOT, padding
        eot     [n_cls]                         EOT position of each class prompt
    """

    prefix: Tensor
    suffix: Tensor
    eot: Tensor
    seq_len: int  # positions the tower runs on for the class prompts (max EOT + 1)
    positional: Tensor  # [context_length, W]
    attn_mask: Tensor | None  # [context_length, context_length]
    transformer: nn.Module
    ln_final: nn.Module
    projection: Tensor | nn.Module | None
    token_embedding: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    classnames: tuple[str, ...]
    n_ctx: int
    logit_scale: float
    share_prefix: bool = False  # run SOS + context once per prompt (needs `fast_blocks`)
    fast_blocks: bool = False  # every block is a standard open_clip block under a causal mask
    precision: Precision = "fp32"
    hand_backward: bool = False  # shared-prefix path through backward.py (needs share_prefix)

    @property
    def width(self) -> int:
        """W, the width of the token embeddings (and of a context vector)."""
        return int(self.prefix.shape[-1])

    @property
    def feature_dim(self) -> int:
        """D, the width of the projected text features (that of the image features too)."""
        with torch.no_grad():
            return int(self.project(self.positional[:1]).shape[-1])

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def rows(self, n_classes: int) -> int:
        """Token rows one prompt runs through the tower for `n_classes` classes:
        1 + n_ctx + n (S - 1 - n_ctx) with the shared prefix, n S without (S = seq_len)."""
        if self.share_prefix:
            return 1 + self.n_ctx + n_classes * (self.seq_len - 1 - self.n_ctx)
        return n_classes * self.seq_len

    def pass_flops(self, n_classes: int) -> float:
        """Approximate FLOPs of one forward (or one input-gradient backward) of one prompt over
        `n_classes` classes: 24 W^2 per row and layer (q, k, v, out and a 4W MLP)."""
        layers = len(getattr(self.transformer, "resblocks", ())) or 1
        return 24.0 * self.width**2 * layers * self.rows(n_classes)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        *,
        n_ctx: int,
        truncate: bool = True,
        share_prefix: bool = True,
        precision: Precision = "fp32",
    ) -> TextTower:
        """Tokenise "X X ... X {classname}." for every class and keep what the tower needs.

        truncate: run on the first max(EOT) + 1 positions (exact under the causal mask);
        share_prefix: run SOS + context once per prompt where the tower allows it (exact);
        precision: "fp32", or "bf16" autocast of the frozen tower (see the module docstring).
        """
        text = _text_module(model)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if pool != "argmax" or getattr(text, "cls_emb", None) is not None:
            raise UsageError(
                f"backbone text tower pools with '{pool}'; prompt learning needs an EOT-pooled "
                "(argmax) CLIP text tower such as ViT-B-16 or RN50"
            )
        names = tuple(name.replace("_", " ") for name in classnames)
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + name + "." for name in names]
        device = text.token_embedding.weight.device
        tokens = tokenizer(prompts).to(device)  # [n_cls, L]
        eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        context_length = tokens.shape[1]
        if int((tokens[:, -1] != 0).sum()) > 0 and int(eot.max()) == context_length - 1:
            longest = max(names, key=len)
            raise UsageError(
                f"n_ctx={n_ctx} plus class name '{longest}' exceeds the text context length "
                f"{context_length}; use a smaller --n-ctx"
            )
        seq_len = int(eot.max()) + 1 if truncate else context_length
        with torch.no_grad():
            embedding = text.token_embedding(tokens)  # [n_cls, L, W]
        mask = getattr(text, "attn_mask", None)
        causal = mask is not None and torch.equal(mask, causal_mask(mask.shape[0], mask.device))
        if not causal:
            seq_len = context_length  # cutting after EOT is exact only under a causal mask
        fast = causal and supports_fast_blocks(text.transformer)
        return cls(
            prefix=embedding[:, :1].clone(),
            suffix=embedding[:, 1 + n_ctx : seq_len].clone(),
            eot=eot,
            seq_len=seq_len,
            positional=text.positional_embedding.detach(),
            attn_mask=mask,
            transformer=text.transformer,
            ln_final=text.ln_final,
            projection=text.text_projection,
            token_embedding=text.token_embedding,
            tokenizer=tokenizer,
            classnames=names,
            n_ctx=n_ctx,
            logit_scale=float(model.logit_scale.exp()),
            share_prefix=share_prefix and fast,
            fast_blocks=fast,
            precision=precision,
            hand_backward=fast and backward.supported(text.transformer),
        )

    def with_options(
        self,
        *,
        share_prefix: bool | None = None,
        precision: Precision | None = None,
        hand_backward: bool | None = None,
    ) -> TextTower:
        """The same tower with other compute options (tensors are shared, not copied).
        hand_backward=True is honoured only where the tower supports it."""
        supported = self.fast_blocks and backward.supported(self.transformer)
        return replace(
            self,
            share_prefix=self.share_prefix
            if share_prefix is None
            else share_prefix and self.fast_blocks,
            precision=self.precision if precision is None else precision,
            hand_backward=self.hand_backward
            if hand_backward is None
            else hand_backward and supported,
        )

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """bf16 autocast on `device` when precision is bf16; otherwise nothing.

        Under bf16 the tower's own attention modules (the paths that run open_clip's blocks:
        deep prompts without the hand-written backward, `share_prefix=False`) may use the
        fused kernels again, which the per-sample callers narrow to the math kernel
        (privacy/per_sample.py): torch.func's vjp through the math kernel under autocast fails
        in its backward ("expected scalar type Float but found BFloat16", torch 2.14, CPU),
        while the fused kernel's backward is right (a vmap over it loops, with a warning)."""
        if self.precision != "bf16":
            yield
            return
        with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel(_BF16_ATTENTION):
            yield

    def _run(self, x: Tensor, eot: Tensor) -> Tensor:
        """Tower on embeddings x [N, S, W] (positional added here) -> features [N, D].

        S may be shorter than the context length: the causal mask makes the cut exact.
        """
        seq = x.shape[1]
        x = x + self.positional[:seq].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:seq, :seq]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.project(x)

    def encode(self, ctx: Tensor, class_idx: Tensor | None = None) -> Tensor:
        """Text features of learned prompts, L2-normalised.

        ctx: [*lead, n_ctx, W] context vectors shared by every class; the leading dims batch
             several prompts (clients, or a method's global and local prompt) in one forward.
        class_idx: [n] class ids to score (default: all classes).
        Returns [*lead, n, D].
        """
        prefix, suffix, eot = self.prefix, self.suffix, self.eot
        if class_idx is not None:
            prefix, suffix, eot = prefix[class_idx], suffix[class_idx], eot[class_idx]
        with self.autocast(ctx.device):
            if self.share_prefix and self.hand_backward and per_sample_backward_ahead():
                return backward.encode(self, ctx, suffix, eot)  # normalised, [*lead, n, D]
            if self.share_prefix:
                features = shared_prefix.features(self, ctx, suffix, eot)  # [*lead, n, D]
                return F.normalize(wide(features), dim=-1)
            n = prefix.shape[0]
            lead = ctx.shape[:-2]
            ctx = ctx.unsqueeze(-3).expand(*lead, n, *ctx.shape[-2:])
            x = torch.cat(
                [prefix.expand(*lead, *prefix.shape), ctx, suffix.expand(*lead, *suffix.shape)],
                dim=-2,
            )
            flat = x.reshape(-1, *x.shape[-2:])
            features = self._run(flat, eot.repeat(flat.shape[0] // n))
        return F.normalize(wide(features), dim=-1).reshape(*lead, n, -1)

    def encode_deep(self, ctx: Tensor, deeper: Tensor, class_idx: Tensor | None = None) -> Tensor:
        """Text features [n, D] (L2-normalised) of one prompt whose context is `ctx`
        [n_ctx, W] at the input and `deeper[i - 1]` [n_ctx, W] at the input of block i, for
        i = 1 .. len(deeper) (MaPLe's deep language prompts, Khattak et al. CVPR 2023: each
        replaces the previous block's outputs at the context positions). For per-sample
        gradients the shared-prefix path with its hand-written backward carries them (they are
        the same for every class, like the context); otherwise (one cotangent, where autograd's
        engine is fast) every class's full sequence runs through the tower's own modules."""
        prefix, suffix, eot = self.prefix, self.suffix, self.eot
        if class_idx is not None:
            prefix, suffix, eot = prefix[class_idx], suffix[class_idx], eot[class_idx]
        n, n_ctx = prefix.shape[0], ctx.shape[0]
        with self.autocast(ctx.device):
            if self.share_prefix and self.hand_backward and per_sample_backward_ahead():
                return backward.encode(self, ctx, suffix, eot, deeper)  # normalised, [n, D]
            x = torch.cat([prefix, ctx.expand(n, *ctx.shape), suffix], dim=1)  # [n, S, W]
            seq = x.shape[1]
            x = x + self.positional[:seq].to(x.dtype)
            mask = None if self.attn_mask is None else self.attn_mask[:seq, :seq]
            first = getattr(self.transformer, "batch_first", True)
            for i, block in enumerate(self.transformer.resblocks):
                if 1 <= i <= deeper.shape[0]:
                    deep = deeper[i - 1].to(x.dtype).expand(n, n_ctx, x.shape[-1])
                    x = torch.cat([x[:, :1], deep, x[:, 1 + n_ctx :]], dim=1)
                x = block(x if first else x.transpose(0, 1), attn_mask=mask)
                x = x if first else x.transpose(0, 1)
            x = self.ln_final(x)
            features = self.project(x[torch.arange(n, device=x.device), eot])
        return F.normalize(wide(features), dim=-1)

    def project(self, x: Tensor) -> Tensor:
        """The text projection [..., W] -> [..., D] (the identity for a tower without one)."""
        if isinstance(self.projection, nn.Module):
            return self.projection(x)
        if self.projection is not None:
            return x @ self.projection.to(x.dtype)
        return x

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Features [len(texts), D] of hand-written prompts, L2-normalised (zero-shot CLIP)."""
        tokens = self.tokenizer(list(texts)).to(self.positional.device)
        eot = tokens.argmax(dim=-1)
        seq = int(eot.max()) + 1
        with torch.no_grad(), self.autocast(self.positional.device):
            x = self.token_embedding(tokens[:, :seq])
            return F.normalize(wide(self._run(x, eot)), dim=-1)

    def embed_phrase(self, phrase: str) -> Tensor:
        """Token embeddings [n_words, W] of a phrase (CoOp's ctx_init), without SOS/EOT."""
        tokens = self.tokenizer([phrase])[0].to(self.positional.device)
        n = int(tokens.argmax()) - 1
        with torch.no_grad():
            return self.token_embedding(tokens[1 : 1 + n]).clone()
