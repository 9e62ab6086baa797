"""Prompt learners: how prompt vectors become class text features and logits.

One file per learner, each a frozen dataclass registered with `@LEARNERS.register("name")`;
`methods/learners/<name>.toml` holds its options' defaults. The scheme (fpl_bench/schemes/)
decides which prompt tensors a client holds and shares; the learner scores them.

Other installed packages add learners through the entry-point group `fpl_bench.learners`
(plugins: see fpl_bench/registry.py).
"""

from fpl_bench.registry import Registry

LEARNERS: Registry = Registry(
    "learner", __name__, group="fpl_bench.learners", base="fpl_bench.learners._base:PromptLearner"
)
