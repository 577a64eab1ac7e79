"""Reading a node's recording (`enshuffle node --record DIR`): one npz per accepted message.

`DIR/%08d-%s.npz` (running number, command) holds the header JSON as a uint8 array `header` and
each array as `arr.<name>`. Loaded with allow_pickle=False: a recording is data, never code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^(\d{8})-([A-Z]+)\.npz$")


class RecordingError(Exception):
    """A recording directory that cannot be read; the message names the file."""


@dataclass
class RecordedMessage:
    number: int
    command: str  # STATIC | BATCH
    header: dict
    arrays: dict[str, np.ndarray]


def load_recording(directory: str | Path) -> list[RecordedMessage]:
    """Every recorded message in the order the node accepted them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecordingError(f"recording directory {directory} does not exist")
    out = []
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if not m:
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(bytes(npz["header"]).decode("utf-8"))
                arrays = {k[4:]: np.asarray(npz[k]) for k in npz.files if k.startswith("arr.")}
        except (OSError, ValueError, KeyError) as exc:
            raise RecordingError(f"cannot read recorded message {path}: {exc}") from None
        out.append(RecordedMessage(int(m.group(1)), m.group(2), header, arrays))
    return out
