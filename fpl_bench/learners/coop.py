"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv:2109.01134; reference KaiyangZhou/CoOp `trainers/coop.py`).

n_ctx learnable context vectors replace the words of "a photo of a {class}."; the class text
feature is the frozen text tower's output at EOT, and logits are CLIP's cosine logits
(fpl_bench/text_tower/). Cross-entropy per sample, no prior. One prompt component.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import PromptLearner


@LEARNERS.register("coop")
@dataclass(frozen=True)
class CoOp(PromptLearner):
    """Context vectors scored by cosine logits; the CoOp learner has no options."""
