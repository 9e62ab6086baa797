"""Federation schemes: which prompt parameters a client holds, which it shares, how its prompt
is built from them, what it uploads and how the server aggregates.

One file per scheme, each a frozen dataclass registered with `@SCHEMES.register("name")`;
`methods/schemes/<name>.toml` holds its options' defaults. The driver calls the hooks of
`fpl_bench/schemes/_base.py` and never names a scheme.

Other installed packages add schemes through the entry-point group `fpl_bench.schemes`
(plugins: see fpl_bench/registry.py).
"""

from fpl_bench.registry import Registry

SCHEMES: Registry = Registry(
    "scheme", __name__, group="fpl_bench.schemes", base="fpl_bench.schemes._base:Scheme"
)
