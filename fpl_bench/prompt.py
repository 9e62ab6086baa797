"""Learnable context vectors through the frozen text tower of an open_clip CLIP.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_bench.errors import UsageError

PLACEHOLDER = "X"


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

    @property
    def width(self) -> int:
        """W, the width of the token embeddings (and of a context vector)."""
        return int(self.prefix.shape[-1])

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        *,
        n_ctx: int,
        truncate: bool = True,
    ) -> TextTower:
        """Tokenise "X X ... X {classname}." for every class and keep what the tower needs."""
        text = _text_module(model)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if pool != "argmax" or getattr(text, "cls_emb", None) is not None:
            raise UsageError(
                f"backbone text tower pools with '{pool}'; prompt learning needs an EOT-pooled "
                "(argmax) CLIP text tower such as ViT-B-16 or RN50"
            )
        names = tuple(name.replace("_", " ") for name in classnames)
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + name + "." for name in names]
        tokens = tokenizer(prompts)  # [n_cls, L]
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
        )

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
        if isinstance(self.projection, nn.Module):
            x = self.projection(x)
        elif self.projection is not None:
            x = x @ self.projection
        return x

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
        n = prefix.shape[0]
        lead = ctx.shape[:-2]
        ctx = ctx.unsqueeze(-3).expand(*lead, n, *ctx.shape[-2:])
        x = torch.cat(
            [prefix.expand(*lead, *prefix.shape), ctx, suffix.expand(*lead, *suffix.shape)],
            dim=-2,
        )
        flat = x.reshape(-1, *x.shape[-2:])
        features = self._run(flat, eot.repeat(flat.shape[0] // n))
        return F.normalize(features, dim=-1).reshape(*lead, n, -1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Features [len(texts), D] of hand-written prompts, L2-normalised (zero-shot CLIP)."""
        tokens = self.tokenizer(list(texts))
        eot = tokens.argmax(dim=-1)
        seq = int(eot.max()) + 1
        with torch.no_grad():
            x = self.token_embedding(tokens[:, :seq])
            return F.normalize(self._run(x, eot), dim=-1)

    def embed_phrase(self, phrase: str) -> Tensor:
        """Token embeddings [n_words, W] of a phrase (CoOp's ctx_init), without SOS/EOT."""
        tokens = self.tokenizer([phrase])[0]
        n = int(tokens.argmax()) - 1
        with torch.no_grad():
            return self.token_embedding(tokens[1 : 1 + n]).clone()
