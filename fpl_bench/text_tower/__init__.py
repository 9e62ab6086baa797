"""The frozen CLIP text tower that prompt learning trains through, in three modules:

- `tower.py`: `TextTower`, the prompted sequences (SOS, context slots, class tokens) and the
  encode paths (shared prefix, every class's full sequence, MaPLe's deep prompts, plain text);
- `shared_prefix.py`: the shared-prefix forward (open_clip's blocks written out, the prefix run
  once per prompt) and the named tensors it saves for the hand-written backward;
- `backward.py`: that backward, batched over per-sample cotangents, and the autograd.Function
  and vmap rules that plug it into torch.func.
"""

from fpl_bench.text_tower.tower import PLACEHOLDER, TextTower

__all__ = ["PLACEHOLDER", "TextTower"]
