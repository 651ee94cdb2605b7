"""Clients of different budgets in one federation of MobileNet-V2s (DAC, HeteroFL).

A tier is a MobileNet-V2 configuration plus the channels of the server model it keeps:
a DAC budget selects a snapshot of the search (its surviving expansion channels), a
width multiplier keeps the first channels of every layer (HeteroFL's nested slicing).
The server model is the union of the tiers' channels (the full model when a tier is
full); with one tier it is that tier's model, freshly initialised, which is DAC's own
federation (dac_spec 4.1: every client trains the selected configuration, FedAvg of
the full state). Each tier runs the base algorithm (FedAvg: HeteroAvg) on its channel
cut, and the server averages every channel over the clients that own it
(trainers/aggregation.owner_mean), so with every client at the full budget this is
FedAvg exactly (tested).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from models.mobilenet_v2 import (
    NUM_BLOCKS,
    MobileNetConfig,
    channel_layout,
    count_macs,
    count_params,
    set_widths,
)
from trainers.algorithms.base import HParams
from trainers.algorithms.submodel_federation import SubModelFederation, inco_groups
from trainers.dac.snapshots import read_snapshots, select_snapshot
from trainers.names import SUBMODEL_TRAINERS
from trainers.registry import AlgorithmOptions, build_algorithm
from trainers.submodels import ChannelView, module_names


@dataclass(frozen=True)
class ChannelTier:
    name: str
    config: MobileNetConfig
    # kept expansion channels of the full model per block (None: the first e of each)
    expansion_channels: tuple[tuple[int, ...], ...] | None
    source: str

    @property
    def macs(self) -> int:
        return count_macs(self.config)

    @property
    def params(self) -> int:
        return count_params(self.config)


def parse_budgets(text: str) -> list[tuple[float, float]]:
    """`M:P,M:P,...` (MACs and parameter budgets; `inf` for no limit)."""
    budgets = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            budgets.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise ValueError(f"--budgets takes MACS:PARAMS pairs separated by commas (e.g. "
                             f"26400000:720000,94604801:2296923); got {item!r}") from None
    if not budgets:
        raise ValueError("--budgets is empty")
    return budgets


def budget_tiers(budgets: Sequence[tuple[float, float]], snapshots_path: str
                 ) -> list[ChannelTier]:
    """One tier per budget, by DAC's rule on the snapshot file; smallest model first."""
    snapshots = read_snapshots(snapshots_path)
    tiers = []
    for macs, params in budgets:
        snap = select_snapshot(snapshots, macs, params, snapshots_path)
        name = f"dac_{snap.macs / 1e6:.1f}M"
        source = (f"budget {macs:,.0f} MACs / {params:,.0f} params -> {snap.line()}"
                  + ("" if snap.channels else " (the file names no channels: the first e "
                     "of each block are kept)"))
        tiers.append(ChannelTier(name, snap.config, snap.channels, source))
    return _distinct_sorted(tiers)


def width_tiers(multipliers: Sequence[float]) -> list[ChannelTier]:
    tiers = [ChannelTier(f"wm{wm:g}", MobileNetConfig.width_multiplier(wm), None,
                         f"width multiplier {wm:g} (first channels of every layer)")
             for wm in multipliers]
    return _distinct_sorted(tiers)


def _distinct_sorted(tiers: list[ChannelTier]) -> list[ChannelTier]:
    unique = {t.name: t for t in tiers}
    return sorted(unique.values(), key=lambda t: (t.macs, t.params))


def _kept(tier: ChannelTier, b: int) -> np.ndarray:
    e = tier.config.blocks[b][0]
    if tier.expansion_channels is None:
        return np.arange(e)
    return np.asarray(tier.expansion_channels[b])


def server_config(tiers: Sequence[ChannelTier]) -> tuple[MobileNetConfig, list[np.ndarray]]:
    """The union model: per block the union of the tiers' expansion channels (indices of
    the full model), every other width the largest any tier has."""
    unions = [np.unique(np.concatenate([_kept(t, b) for t in tiers])) for b in range(NUM_BLOCKS)]
    widest = tiers[-1].config
    blocks = tuple((len(u), max(t.config.blocks[b][1] for t in tiers), widest.blocks[b][2])
                   for b, u in enumerate(unions))
    cfg = MobileNetConfig(stem=max(t.config.stem for t in tiers), blocks=blocks,
                          final=max(t.config.final for t in tiers))
    return cfg, unions


def tier_channels(tier: ChannelTier, server: MobileNetConfig, unions: Sequence[np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """The tier's indices into each channel set of the server's layout."""
    widths = set_widths(tier.config, server)
    full = set_widths(server, server)
    channels = {}
    for name, width in widths.items():
        if name.startswith("exp"):
            b = int(name[3:])
            channels[name] = np.searchsorted(unions[b], _kept(tier, b))
        elif width != full[name]:
            channels[name] = np.arange(width)  # nested (prefix) widths
    return channels


def build_channel_federation(trainer: str, tiers: Sequence[ChannelTier], tasks: Sequence[Any],
                             server_task: Any, hp: HParams, options: AlgorithmOptions,
                             num_clients: int, example_x: Any) -> SubModelFederation:
    """`tasks[k]`: tier k's task (its MobileNet), `server_task` the union model's."""
    base_name, with_inco = SUBMODEL_TRAINERS[trainer]
    if with_inco:
        raise ValueError(f"--trainer {trainer}: InCo's cross-layer mixing is defined for "
                         f"stage-split ResNets and ViTs, not MobileNet tiers; use "
                         f"{trainer.replace('inco', 'hetero')}")
    server_cfg, unions = server_config(tiers)
    layout = channel_layout(server_cfg)
    server_shape = jax.eval_shape(server_task.model.init, jax.random.PRNGKey(0), example_x)
    universe = module_names(*server_shape)
    views = []
    for tier, task in zip(tiers, tasks, strict=True):
        shape = jax.eval_shape(task.model.init, jax.random.PRNGKey(0), example_x)
        views.append(ChannelView(module_names(*shape), universe, layout,
                                 tier_channels(tier, server_cfg, unions)))
    bases = [build_algorithm(base_name, task, hp, options) for task in tasks]
    server = build_algorithm(base_name, server_task, hp, options)
    for base in (*bases, server):
        base.integer_mean = "trunc"   # DAC and InCo load the averaged counter truncated
    costs = [{"macs_per_image": t.macs, "params": t.params} for t in tiers]
    federation = SubModelFederation(bases, [t.name for t in tiers],
                                    inco_groups(num_clients, len(tiers)), example_x,
                                    views=views, server=server, tier_costs=costs)
    federation.name = trainer
    return federation


def channel_tier_lines(tiers: Sequence[ChannelTier], federation: SubModelFederation) -> str:
    counts = np.bincount(federation.tier_of, minlength=len(tiers))
    lines = ["channel tiers (smallest first):"]
    for tier, n in zip(tiers, counts, strict=True):
        lines.append(f"  {tier.name:12s} {tier.macs:>12,} MACs {tier.params:>10,} params, "
                     f"{n} clients: {tier.source}")
    return "\n".join(lines)
