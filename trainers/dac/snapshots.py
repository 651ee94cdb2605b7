"""DAC's snapshot file and budget rule (dac_spec 2.6, 2.7).

The file maps an epoch (a string) to {"macs", "params", "cfg": 17 x [e, c_out, s]} in
ascending epoch order, DAC's `net_cfg.json` format; the search here adds "channels"
(the expansion indices each block keeps) and "test_acc". Files without "channels" (the
authors' shipped one) still select and retrain; a federation that cuts the model by
channel then keeps the first e channels of each block (and says so).

The rule: walk the file in order and take the FIRST entry with macs < M and params < P
(both strict), the least compressed snapshot that fits. Where DAC crashes when nothing
fits (its message is unreachable), this raises a `DataError` naming the smallest one.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import DataError
from models.mobilenet_v2 import FULL_BLOCKS, NUM_BLOCKS, MobileNetConfig
from utils.rundir import atomic_write


@dataclass(frozen=True)
class Snapshot:
    epoch: str
    macs: int
    params: int
    config: MobileNetConfig
    channels: tuple[tuple[int, ...], ...] | None = None
    test_acc: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"macs": self.macs, "params": self.params,
                               "cfg": self.config.to_json()}
        if self.channels is not None:
            out["channels"] = [list(c) for c in self.channels]
        if self.test_acc is not None:
            out["test_acc"] = self.test_acc
        return out

    def line(self) -> str:
        return (f"epoch {self.epoch}: {self.macs:,} MACs, {self.params:,} params, "
                f"expansions {','.join(str(e) for e in self.config.expansions)}")


def write_snapshots(path: str | os.PathLike, snapshots: list[Snapshot]) -> None:
    """Atomically: a reader never sees half a file (temporary file, then rename)."""
    atomic_write(Path(path), json.dumps({s.epoch: s.to_json() for s in snapshots}, indent=1))


def _bad(path: Any, found: str) -> DataError:
    return DataError(str(path), "a DAC snapshot json: {\"<epoch>\": {\"macs\": number, "
                     "\"params\": number, \"cfg\": 17 x [e, c_out, stride]}, ...}",
                     "run the search (bash runners/dac/run_search.sh) or pass the "
                     "authors' net_cfg.json", found)


def read_snapshots(path: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in file order; anything malformed is a DataError naming the entry."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not readable json ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise _bad(path, "an empty file or not an object of epochs")
    snapshots = []
    for epoch, entry in raw.items():
        try:
            config = MobileNetConfig.from_json(entry["cfg"])
            channels = entry.get("channels")
            if channels is not None:
                channels = tuple(tuple(int(i) for i in c) for c in channels)
                if len(channels) != NUM_BLOCKS or any(
                        len(c) != e or len(set(c)) != e or min(c, default=0) < 0
                        or max(c, default=0) >= full
                        for c, e, (full, _, _) in zip(channels, config.expansions,
                                                      FULL_BLOCKS, strict=True)):
                    raise ValueError("channels must list, per block, e distinct indices "
                                     "of the full model's expanded channels")
            acc = entry.get("test_acc")
            snapshots.append(Snapshot(str(epoch), int(entry["macs"]), int(entry["params"]),
                                      config, channels, None if acc is None else float(acc)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _bad(path, f"entry {epoch!r}: {e}") from None
    return snapshots


def select_snapshot(snapshots: list[Snapshot], macs_budget: float, params_budget: float,
                    path: Any = "<snapshots>") -> Snapshot:
    """DAC's rule: the first snapshot with macs < M and params < P."""
    for s in snapshots:
        if s.macs < macs_budget and s.params < params_budget:
            return s
    smallest = min(snapshots, key=lambda s: (s.macs, s.params))
    raise DataError(str(path), f"a snapshot under {macs_budget:,.0f} MACs and "
                    f"{params_budget:,.0f} params (both strict)",
                    "raise the budget, or search longer for smaller models",
                    f"none fits; the smallest is {smallest.line()}")
