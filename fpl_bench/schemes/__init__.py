"""Federation schemes: which prompt parameters a client holds, which it shares, how its prompt
is built from them, what it uploads and how the server aggregates.

One file per scheme, each a frozen dataclass registered with `@SCHEMES.register("name")`;
`methods/schemes/<name>.toml` holds its options' defaults. The driver calls the hooks of
`fpl_bench/schemes/_base.py` and never names a scheme.
"""

from fpl_bench.registry import Registry

SCHEMES: Registry = Registry("scheme", __name__)
