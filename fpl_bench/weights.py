"""Read CLIP weight files into a state dict without running code stored in them.

    state, info = read_weights(Path("ViT-B-16.pt"))   # {key: Tensor}, WeightsInfo
    info.kind           # "torch" | "safetensors" | "torchscript"
    info.quick_gelu     # True for OpenAI-format weights (built with QuickGELU)

Formats:

- **safetensors** (`*.safetensors`, the hub's `open_clip_model.safetensors`): read with
  `safetensors.torch.load_file`, a format that holds tensors only.
- **torch.save files** (a state dict, `{"state_dict": ...}` as training loops save it, keys
  optionally prefixed `module.`): `torch.load(weights_only=True)`, whose unpickler builds
  tensors and plain containers only.
- **TorchScript archives**: OpenAI's released CLIP files (`ViT-B-16.pt`, `RN50.pt` under
  `~/.cache/clip`), which CoOp and its federated forks (FedOTP, FedPGP, DP-FPL: `clip/clip.py`
  `load`) open with `torch.jit.load`. PyTorch documents `torch.jit.load` as unsafe for files
  that are not trusted (it compiles and can run the archive's TorchScript code), and
  `torch.load(weights_only=True)` refuses such archives. Here the archive is read as the zip it
  is: `data.pkl` is unpickled by `_ArchiveUnpickler`, which resolves only tensor rebuilding,
  storage types, `OrderedDict` and TorchScript's list helpers, and stands an inert
  `_ScriptObject` in for every module class (`__torch__.*`); tensors are read from the
  archive's `data/<key>` records. The `code/` folder and `constants.pkl` are never read. Any
  other global in the pickle is refused (an UnpicklingError, reported as a UsageError).

What is trusted: nothing executable in the file. What is not checked: that the tensors are
the weights they claim to be (the caller loads them strictly into the named architecture, so
a wrong file fails on missing keys or shapes, and the sha256 digest of the file keys the
feature cache).

OpenAI-format weights were trained with QuickGELU, which the file does not record as a
number: `quick_gelu` is True for a TorchScript archive that defines a `QuickGELU` module, and
for any state dict carrying OpenAI's `input_resolution` / `context_length` / `vocab_size`
entries (dropped from the returned state). Otherwise the architecture name decides (e.g.
`ViT-B-16-quickgelu`).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fpl_bench.errors import UsageError

OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")

# Storage classes a TorchScript archive names for its tensors, and their element types.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# torch.jit._pickle helpers that wrap a plain value (list, tagged container) in data.pkl.
_SCRIPT_HELPERS = (
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "restore_type_tag",
)


@dataclass(frozen=True)
class WeightsInfo:
    """How a weights file was read: its format and whether it is OpenAI's (QuickGELU)."""

    kind: Literal["torch", "safetensors", "torchscript"]
    quick_gelu: bool


def read_weights(path: Path) -> tuple[dict[str, Tensor], WeightsInfo]:
    """The state dict in a weights file (see the module docstring for the formats).

    UsageError (one line naming the file) when the file is missing, unreadable, or holds no
    state dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        why = "is a folder; give the file in it" if path.is_dir() else "does not exist"
        raise UsageError(f"weights file {path} {why}")
    if path.suffix == ".safetensors":
        state, kind, quick_gelu = _read_safetensors(path), "safetensors", False
    elif is_torchscript(path):
        state, quick_gelu = _read_torchscript(path)
        kind = "torchscript"
    else:
        state, kind, quick_gelu = _read_torch(path), "torch", False
    if any(key in state for key in OPENAI_META_KEYS):
        quick_gelu = True
        state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, WeightsInfo(kind=kind, quick_gelu=quick_gelu)


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a `constants.pkl`, torch's test)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(_record_name(name) == "constants.pkl" for name in archive.namelist())


def _record_name(name: str) -> str:
    """'archive/data/0' -> 'data/0': records are stored under one top-level folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - open_clip_torch depends on safetensors
        raise UsageError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as err:  # the library raises several types for a damaged file
        raise UsageError(f"weights file {path} is not readable safetensors ({err})") from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    """A state dict from a torch.save file: plain, or under "state_dict"."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a corrupt file
        raise UsageError(
            f"weights file {path} is not a readable torch file ({type(err).__name__}): give a "
            "state dict saved by torch.save or a .safetensors file (re-download it if damaged)"
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    return _check_state(loaded, path)


def _check_state(loaded: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise UsageError(f"weights file {path} holds no state dict of tensors")
    return dict(loaded)


# ----------------------------------------------------------------------------- TorchScript


class _ScriptObject:
    """Stands in for a TorchScript module object of the archive: keeps its pickled attributes
    (parameters, buffers, sub-modules, plain values) and nothing else; has no behaviour."""

    attributes: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, Mapping) else {}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(
    storage: Tensor,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    """Stands in for torch._utils._rebuild_tensor_v2: a strided view of a flat storage."""
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _passthrough(value: Any, *_: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl` allowing only the globals listed in `find_class`."""

    def __init__(self, blob: bytes, read_record: Callable[[str], bytes]) -> None:
        import io

        super().__init__(io.BytesIO(blob))
        self._read_record = read_record
        self._storages: dict[str, Tensor] = {}
        self.classes: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            self.classes.add(name)
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _SCRIPT_HELPERS:
            return _passthrough
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> Tensor:
        """('storage', storage type, key, location, numel) -> flat tensor of data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            if numel == 0 or not raw:
                flat = torch.empty(0, dtype=storage_type.dtype)
            else:
                flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _read_torchscript(path: Path) -> tuple[dict[str, Tensor], bool]:
    """(state dict, defines QuickGELU?) of a TorchScript archive, read without torch.jit."""
    with zipfile.ZipFile(path) as archive:
        records = {_record_name(name): name for name in archive.namelist()}
        if "data.pkl" not in records:
            raise UsageError(f"weights file {path}: TorchScript archive without data.pkl")
        byteorder = records.get("byteorder")
        if byteorder is not None and archive.read(byteorder).strip() not in (b"", b"little"):
            raise UsageError(f"weights file {path}: big-endian archives are not supported")

        def read_record(name: str) -> bytes:
            if name not in records:
                raise pickle.UnpicklingError(f"record {name} is missing")
            return archive.read(records[name])

        unpickler = _ArchiveUnpickler(archive.read(records["data.pkl"]), read_record)
        try:
            root = unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as err:
            raise UsageError(
                f"weights file {path}: unreadable TorchScript archive ({err})"
            ) from None
    if not isinstance(root, _ScriptObject):
        raise UsageError(f"weights file {path}: TorchScript archive holds no module")
    state: dict[str, Tensor] = {}
    _collect_tensors(root, "", state, seen=set())
    return state, "QuickGELU" in unpickler.classes


def _collect_tensors(obj: _ScriptObject, prefix: str, out: dict[str, Tensor], seen: set) -> None:
    """Every tensor attribute reachable from `obj`, keyed by its dotted attribute path (the
    keys of the module's state dict, plus non-parameter tensor attributes such as masks)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.attributes.items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)
