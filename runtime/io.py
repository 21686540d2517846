"""Crash-safe file writing and weights-only loading.

Every file is written under a temporary name in the destination folder and renamed into
place with ``os.replace`` (atomic on POSIX), so a killed process never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from runtime.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: shard-building workers never need it
    import torch


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # read once: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)  # mkstemp creates 0600; give the usual file mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(state_dict: dict[str, "torch.Tensor"], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write straight into the temporary file (no serialised copy of the tensors in memory)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` straight into the temporary file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_state_dict(path: str | Path, allowed_classes: Sequence[type] = ()) -> dict:
    """Load a checkpoint file: ``.safetensors`` directly, anything else with ``weights_only=True``.

    Returns the raw object (a state dict, or a dict wrapping one under ``model``/``module``).
    ``allowed_classes`` are the only classes beyond tensors and plain containers the file may
    hold (allowed for this load only, e.g. ``argparse.Namespace`` for the ``args`` of official
    training scripts); a file needing any other class raises an ``InputError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed_classes)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        refused = _refused_classes(path, allowed_classes)
        if refused:
            allowed = ", ".join(_qualified_name(c) for c in allowed_classes) or "none"
            raise InputError(
                f"cannot load checkpoint {path} with weights_only=True: it needs classes "
                f"that are not allowed: {', '.join(refused)} (allowed beyond tensors and "
                f"containers: {allowed}); pass a file that holds the model weights") from err
        raise ValueError(f"cannot load checkpoint {path} with weights_only=True: {err}") from err


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _refused_classes(path: Path, allowed_classes: Sequence[type]) -> list[str]:
    """The globals a zip-format torch file needs beyond torch's and ``allowed_classes``
    (empty when the file cannot be inspected, e.g. the legacy non-zip format)."""
    import torch

    allowed = {_qualified_name(c) for c in allowed_classes}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not inspectable: the caller reports torch's error
        return []
    return sorted(set(needed) - allowed)
