"""Prompt learners: how prompt vectors become class text features and logits.

One file per learner, each a frozen dataclass registered with `@LEARNERS.register("name")`;
`methods/learners/<name>.toml` holds its options' defaults. The scheme (fpl_bench/schemes/)
decides which prompt tensors a client holds and shares; the learner scores them.
"""

from fpl_bench.registry import Registry

LEARNERS: Registry = Registry("learner", __name__)
