"""Where each privatized parameter gets its noise, and when shared parameters synchronise:
one rule for every scheme, set by the run's trust model (docs/design.md, "Privacy").

    trust "server" (trusted aggregator; the DP-FPL paper's setting): every scheme's shared
        parameters synchronise every local step. Each client sends the clipped per-sample SUM
        of their gradients; the server adds N(0, (sigma C)^2) once to the sum over clients and
        applies it over the expected total batch. Personal parameters are noised by their
        client (they are released as the personalized prompt).
    trust "client" (untrusted server, local DP): every parameter is noised by its client
        before anything leaves it (DP-SGD), and the scheme keeps its own synchronisation.

Without privacy every scheme keeps its own synchronisation and nothing is noised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Trust = Literal["server", "client"]
TRUST_MODELS: tuple[str, ...] = ("server", "client")


@dataclass(frozen=True)
class Placement:
    """sync: when shared parameters meet the server; server/client: the step parameters whose
    clipped per-sample gradients get their noise at the server / at the client."""

    sync: Literal["round", "step"]
    server: tuple[str, ...] = ()
    client: tuple[str, ...] = ()


def place_noise(
    *,
    step_names: Sequence[str],
    shared: Sequence[str],
    scheme_sync: Literal["round", "step"],
    trust: Trust,
    private: bool,
) -> Placement:
    """The placement for a scheme whose step parameters are `step_names`, of which `shared`
    are synchronised with the server, under `trust` (see the module docstring)."""
    missing = [name for name in shared if name not in step_names]
    if missing:
        raise ValueError(f"shared parameters {missing} must be step parameters {list(step_names)}")
    if not private:
        return Placement(sync=scheme_sync)
    if trust == "server":
        personal = tuple(n for n in step_names if n not in shared)
        return Placement(
            sync="step" if shared else scheme_sync, server=tuple(shared), client=personal
        )
    if trust == "client":
        return Placement(sync=scheme_sync, client=tuple(step_names))
    raise ValueError(f"unknown trust model {trust!r}; one of {TRUST_MODELS}")
