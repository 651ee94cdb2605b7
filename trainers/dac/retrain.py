"""Retrain a DAC configuration from scratch, or the width-multiplier baseline (dac_spec
3.1, 3.2): `python -m trainers.dac.retrain --data_dir ROOT --out DIR` with one of

  --snapshots FILE --epoch K                    the snapshot of epoch K
  --snapshots FILE --macs_budget M --params_budget P   the snapshot DAC's rule selects
  --width_multiplier WM                         mbn2_std(width_mul=WM)
  --expansions e0,...,e16                       any 17 expansion widths

SGD lr 0.1 (cosine), momentum 0.9, weight decay 5e-4, batch 100, test every epoch.
"""

from pathlib import Path

from absl import app, flags

from data.errors import DataError
from models.mobilenet_v2 import (
    MobileNetConfig,
    count_macs,
    count_params,
    mobilenet_v2,
    peak_feature_map,
)
from trainers.dac.centralised import (
    define_training_flags,
    load_centralised,
    settings_from_flags,
    train,
    write_json,
)
from trainers.dac.snapshots import read_snapshots, select_snapshot

FLAGS = flags.FLAGS
define_training_flags("runs/dac_retrain", epochs=10, lr=0.1, batch_size=100)
flags.DEFINE_string("snapshots", None, "snapshot json (the search's or DAC's net_cfg.json)")
flags.DEFINE_string("epoch", None, "the snapshot to retrain (its key in the file)")
flags.DEFINE_float("macs_budget", None, "select by DAC's rule: MACs < this ...")
flags.DEFINE_float("params_budget", None, "... and params < this")
flags.DEFINE_float("width_multiplier", None, "train mbn2_std(width_mul=this) instead")
flags.DEFINE_list("expansions", None, "train these 17 expansion widths instead")


def chosen_config() -> tuple[MobileNetConfig, str]:
    """The configuration the flags name and a description of where it came from."""
    picks = [FLAGS.width_multiplier is not None, FLAGS.expansions is not None,
             FLAGS.snapshots is not None]
    if sum(picks) != 1:
        raise ValueError("name one model: --snapshots FILE (with --epoch or the budgets), "
                         "--width_multiplier WM or --expansions e0,...,e16")
    if FLAGS.width_multiplier is not None:
        return (MobileNetConfig.width_multiplier(FLAGS.width_multiplier),
                f"width multiplier {FLAGS.width_multiplier}")
    if FLAGS.expansions is not None:
        return MobileNetConfig.from_expansions([int(e) for e in FLAGS.expansions]), "expansions"
    snapshots = read_snapshots(FLAGS.snapshots)
    if FLAGS.epoch is not None:
        found = [s for s in snapshots if s.epoch == FLAGS.epoch]
        if not found:
            raise DataError(FLAGS.snapshots, f"a snapshot of epoch {FLAGS.epoch}",
                            "pass one of its epochs",
                            f"epochs {', '.join(s.epoch for s in snapshots)}")
        snap = found[0]
    else:
        snap = select_snapshot(snapshots, FLAGS.macs_budget or float("inf"),
                               FLAGS.params_budget or float("inf"), FLAGS.snapshots)
    return snap.config, f"{FLAGS.snapshots} {snap.line()}"


def main(argv):
    del argv
    try:
        cfg, source = chosen_config()
    except (ValueError, DataError) as e:
        raise app.UsageError(str(e)) from None
    settings = settings_from_flags(FLAGS)
    cost = {"macs": count_macs(cfg), "params": count_params(cfg),
            "peak_feature_map": peak_feature_map(cfg)}
    print(f"retraining {source}: {cost['macs']:,} MACs, {cost['params']:,} params")
    out = Path(FLAGS.out)
    history = train(mobilenet_v2(10, cfg), settings, load_centralised(FLAGS.data_dir, settings),
                    out, desc="retrain", quiet=FLAGS.quiet)
    write_json(out / "summary.json", {"source": source, "cfg": cfg.to_json(),
                                      "stem": cfg.stem, "final": cfg.final, **cost,
                                      "best_test_acc": max(h["test_acc"] for h in history),
                                      "history": history})
    print(f"best test acc {max(h['test_acc'] for h in history):.4f}; {out / 'summary.json'}")


if __name__ == "__main__":
    app.run(main)
