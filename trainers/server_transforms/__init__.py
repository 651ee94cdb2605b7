"""Server-side transforms of an aggregated update, applied after averaging and before the
server adds the update to its weights. Each transform is a pure function of the update
tree, so it can be jitted, tested by hand and switched off without touching the engine."""

from trainers.server_transforms.inco import InCoConfig, inco_mix

__all__ = ["InCoConfig", "inco_mix"]
