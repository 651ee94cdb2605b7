"""DAC's search (dac_spec 2): `python -m trainers.dac.search --data_dir ROOT --out DIR`.

Trains the gated full MobileNet-V2 on CIFAR-10 with CE + the gate regulariser and, after
every epoch, writes the configuration the gates describe (MACs, parameters, expansion
widths and the surviving channel indices, plus the search model's test accuracy) to
DIR/snapshots.json, atomically. Weights are never pruned during the search, as in DAC:
a gate can recover, so snapshots need not shrink monotonically.

A budget then selects a snapshot (`--macs_budget/--params_budget` here prints which;
trainers.dac.retrain and the federations read the file the same way).
"""

from pathlib import Path

from absl import app, flags

from models.mobilenet_v2 import count_macs, count_params, mobilenet_v2
from trainers.dac.centralised import (
    TrainSettings,
    define_training_flags,
    load_centralised,
    settings_from_flags,
    train,
    write_json,
)
from trainers.dac.gates import BOUND_WEIGHT, PENALTY_FACTOR, THRESHOLD, gate_penalty, pruned_config
from trainers.dac.snapshots import Snapshot, select_snapshot, write_snapshots

FLAGS = flags.FLAGS
define_training_flags("runs/dac_search", epochs=10, lr=0.01, batch_size=256)
flags.DEFINE_float("penalty_factor", PENALTY_FACTOR, "rho: weight of entropy + 0.1 bound")
flags.DEFINE_float("threshold", THRESHOLD, "a channel is removed when |gate| < this")
flags.DEFINE_integer("floor", 8, "fewest channels a block keeps")
flags.DEFINE_float("macs_budget", None, "print the snapshot this MACs budget selects")
flags.DEFINE_float("params_budget", None, "... and this parameter budget")


def run_search(data_dir: str, out: Path, settings: TrainSettings, penalty_factor: float,
               threshold: float, floor: int, quiet: bool = False) -> list[Snapshot]:
    data = load_centralised(data_dir, settings)
    snapshots: list[Snapshot] = []

    def on_epoch(epoch, params, state, record):
        del state
        cfg, channels = pruned_config(params, threshold, floor)
        snap = Snapshot(str(epoch), count_macs(cfg), count_params(cfg), cfg,
                        tuple(tuple(c) for c in channels), record["test_acc"])
        snapshots.append(snap)
        write_snapshots(out / "snapshots.json", snapshots)
        return {"macs": snap.macs, "params": snap.params,
                "expansions": list(cfg.expansions)}

    train(mobilenet_v2(10, gated=True), settings, data, out,
          penalty=lambda p: gate_penalty(p, penalty_factor, BOUND_WEIGHT),
          on_epoch=on_epoch, desc="search", quiet=quiet)
    return snapshots


def main(argv):
    del argv
    settings = settings_from_flags(FLAGS)
    out = Path(FLAGS.out)
    snapshots = run_search(FLAGS.data_dir, out, settings, FLAGS.penalty_factor,
                           FLAGS.threshold, FLAGS.floor, FLAGS.quiet)
    print(f"\n{'epoch':>5} {'MACs':>12} {'params':>10} {'test acc':>8}")
    for s in snapshots:
        print(f"{s.epoch:>5} {s.macs:>12,} {s.params:>10,} {s.test_acc:>8.4f}")
    if FLAGS.macs_budget is not None or FLAGS.params_budget is not None:
        chosen = select_snapshot(snapshots, FLAGS.macs_budget or float("inf"),
                                 FLAGS.params_budget or float("inf"), out / "snapshots.json")
        print(f"budget selects {chosen.line()}")
        write_json(out / "selected.json", {"epoch": chosen.epoch, **chosen.to_json()})
    print(f"snapshots: {out / 'snapshots.json'}")


if __name__ == "__main__":
    app.run(main)
