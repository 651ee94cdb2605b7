"""FeDEQ's compute tiers: the table `--tiers` reads, the clients' assignment, and what a
tier costs in multiply-accumulates.

A tier is a solver budget (forward cap and tolerance, backward cap), the rate of the
equilibrium block's hidden channels it keeps, and its local epochs. Unset fields take
the run's own settings, so a table whose tiers set nothing is the homogeneous run.

`--tiers` takes a JSON file (a list of objects with these fields) or an inline table:
tiers separated by `;`, fields by `,`, e.g. `maxiter=4,width=0.25;maxiter=10;maxiter=20`.
"""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from trainers.algorithms.submodel_federation import inco_groups
from utils.input_error import InputError

ASSIGNMENTS = ("groups", "random")
RANDOM_TIER_STREAM = 0x7135  # added to the seed for the random assignment's draw


@dataclass(frozen=True)
class SolverTier:
    name: str = ""
    maxiter: int | None = None      # forward solver's iteration cap
    tol: float | None = None        # forward solver's tolerance
    bwd_maxiter: int | None = None  # backward solver's cap (unrolled: its steps)
    width: float = 1.0              # share of the block's hidden channels kept
    epochs: int | None = None       # local epochs (caps head and representation epochs)

    def resolved(self, maxiter: int, tol: float, bwd_maxiter: int, epochs: int,
                 bwd_solver: str = "normal_cg") -> "SolverTier":
        """Unset fields from the run's settings; an unrolled gradient's unset step count
        is the tier's forward cap (unrolling as many steps as the solve took), not the
        run's backward cap, whose 50 steps diverge where the iterate is far from a
        fixed point."""
        cap = self.maxiter or maxiter
        bwd = self.bwd_maxiter or (cap if bwd_solver == "unrolled" else bwd_maxiter)
        return replace(self, maxiter=cap, tol=tol if self.tol is None else self.tol,
                       bwd_maxiter=bwd, epochs=self.epochs or epochs)


_FIELDS = {f.name: f.type for f in fields(SolverTier)}


def _tier(entry: dict, position: int) -> SolverTier:
    unknown = set(entry) - set(_FIELDS)
    if unknown:
        raise InputError(f"--tiers: tier {position + 1} has unknown fields "
                         f"{sorted(unknown)}; allowed: {', '.join(_FIELDS)}")
    cast = {"name": str, "maxiter": int, "tol": float, "bwd_maxiter": int, "width": float,
            "epochs": int}
    try:
        values = {k: cast[k](v) for k, v in entry.items()}
    except (TypeError, ValueError):
        raise InputError(f"--tiers: tier {position + 1} has a value of the wrong type: "
                         f"{entry}") from None
    tier = SolverTier(**values)
    if not 0 < tier.width <= 1:
        raise InputError(f"--tiers: tier {position + 1} width {tier.width} must lie in (0, 1]")
    for key in ("maxiter", "bwd_maxiter", "epochs"):
        value = getattr(tier, key)
        if value is not None and value < 1:
            raise InputError(f"--tiers: tier {position + 1} {key} must be at least 1")
    if tier.tol is not None and tier.tol < 0:
        raise InputError(f"--tiers: tier {position + 1} tol must be non-negative")
    return tier if tier.name else replace(tier, name=f"tier{position}")


def parse_tiers(text: str) -> list[SolverTier]:
    """The tiers of `--tiers` (a JSON file or an inline table), as given."""
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            entries = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"--tiers file {text} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--tiers file {text} is not readable JSON: {e}") from None
        if isinstance(entries, dict) and "tiers" in entries:   # a search's output file
            entries = entries["tiers"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(f"--tiers file {text} must hold a list of tier objects")
    else:
        entries = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            entry = {}
            for item in filter(None, (i.strip() for i in part.split(","))):
                key, sep, value = item.partition("=")
                if not sep:
                    raise InputError(f"--tiers: {item!r} is not key=value (for example "
                                     "maxiter=4,width=0.25;maxiter=20)")
                entry[key.strip()] = value.strip()
            entries.append(entry)
    if not entries:
        raise InputError("--tiers holds no tier")
    tiers = [_tier(e, i) for i, e in enumerate(entries)]
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise InputError(f"--tiers: tier names repeat: {names}")
    return tiers


def assign_tiers(num_clients: int, num_tiers: int, how: str, seed: int) -> np.ndarray:
    """Client i's tier: InCo's equal groups of ids (first tier first), or a seeded
    uniform draw."""
    if how == "groups":
        return inco_groups(num_clients, num_tiers)
    if how == "random":
        return np.random.RandomState(seed + RANDOM_TIER_STREAM).randint(0, num_tiers,
                                                                        num_clients)
    raise InputError(f"--tier_assignment {how!r} unknown; allowed: {', '.join(ASSIGNMENTS)}")


def tiers_json(tiers: list[SolverTier], tier_of: np.ndarray) -> str:
    """What a run saves (tiers.json): the resolved table and every client's tier."""
    return json.dumps({"tiers": [asdict(t) for t in tiers],
                       "tier_of": [int(t) for t in tier_of]}, indent=1)
