"""Centralised CIFAR-10 training, shared by DAC's search and its retraining (dac_spec 2.3,
3.1, 3.2): SGD with momentum 0.9 and weight decay 5e-4 on every parameter (gates too),
a cosine learning rate stepped once per epoch, RandomCrop(32, 4) + flip, the test set
scored after every epoch, and the run stopped if an epoch's summed loss reaches 3e6.

What is ours: the seeds (DAC seeds nothing), `train_subset` / `test_subset` (seeded
subsets so that a 2-core CPU can run the recipe; 0 keeps the whole set), and that each
epoch's record goes to `log.jsonl` as it ends, with the best parameters in `best.npz`
(written atomically), so an interrupted run leaves whole files only.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from tqdm import tqdm

from data.augment import random_crop, random_flip
from data.cifar import read_cifar_pickles
from utils.rundir import atomic_file, atomic_write

# The search and retraining transform (dac_spec 2.3); the FL part uses 0.5 / 0.5.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
ABORT_LOSS = 3e6


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_subset: int = 0   # 0: all 50,000 training images
    test_subset: int = 0    # 0: all 10,000 test images
    eval_batch: int = 500


def define_training_flags(out: str, epochs: int, lr: float, batch_size: int) -> None:
    """The flags the search and retraining share, with each program's defaults."""
    flags.DEFINE_string("data_dir", "data", "folder holding cifar10/ (downloaded if missing)")
    flags.DEFINE_string("out", out, "output folder (log.jsonl, best.npz, ...)")
    flags.DEFINE_integer("epochs", epochs, "epochs (cosine learning rate over them)")
    flags.DEFINE_float("lr", lr, "SGD learning rate (cosine over --epochs)")
    flags.DEFINE_integer("batch_size", batch_size, "batch size")
    flags.DEFINE_integer("train_subset", 0, "train on a seeded subset of this many images "
                         "(0: all)")
    flags.DEFINE_integer("test_subset", 0, "score on a seeded subset of this many images "
                         "(0: all)")
    flags.DEFINE_integer("seed", 0, "seed of the init, shuffles, augmentation and subsets")
    flags.DEFINE_bool("quiet", False, "no progress bars")


def settings_from_flags(f: Any) -> TrainSettings:
    return TrainSettings(epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, seed=f.seed,
                         train_subset=f.train_subset, test_subset=f.test_subset)


def _normalise(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / np.float32(255.0)
    return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def _subset(n: int, keep: int, rs: np.random.RandomState) -> np.ndarray:
    return np.arange(n) if not keep or keep >= n else np.sort(rs.permutation(n)[:keep])


def load_centralised(data_dir: str, settings: TrainSettings
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 train and test, normalised, optionally seeded subsets of each."""
    x_train, y_train, x_test, y_test = read_cifar_pickles(
        Path(data_dir), "cifar10", download=True)
    rs = np.random.RandomState(settings.seed)
    tr = _subset(len(y_train), settings.train_subset, rs)
    te = _subset(len(y_test), settings.test_subset, rs)
    return (_normalise(x_train[tr]), y_train[tr].astype(np.int32),
            _normalise(x_test[te]), y_test[te].astype(np.int32))


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0), stepped after each epoch."""
    return base * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))


def _augment(key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    black = -jnp.asarray(MEAN) / jnp.asarray(STD)  # the crop pads raw zeros
    k_crop, k_flip = jax.random.split(key)
    return random_flip(k_flip, random_crop(k_crop, x, black))


def save_params(path: Path, params: Any) -> None:
    """Flat `module/leaf` arrays in an npz, written atomically."""
    flat = {f"{m}/{k}": np.asarray(v) for m, leaves in params.items()
            for k, v in leaves.items()}
    with atomic_file(path, "wb") as f:
        np.savez(f, **flat)


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=1))


def train(forward: Callable, settings: TrainSettings, data: tuple[np.ndarray, ...],
          out_dir: Path | None, penalty: Callable[[Any], jnp.ndarray] | None = None,
          on_epoch: Callable[[int, Any, Any, dict], dict] | None = None, desc: str = "train",
          quiet: bool = False, augment: Callable | None = None) -> list[dict[str, Any]]:
    """Train `forward` (a models.* forward function) and return one record per epoch:
    lr, summed and mean loss, train and test accuracy, seconds; `on_epoch(epoch,
    params, state, record)` may add fields (the search's snapshot). `augment(key, x)`: DAC's
    CIFAR crop and flip by default."""
    augment = augment or _augment
    x_train, y_train, x_test, y_test = data
    model = hk.transform_with_state(forward)
    key = jax.random.PRNGKey(settings.seed)
    params, state = model.init(key, jnp.asarray(x_train[:2]), True)
    buf = jax.tree.map(jnp.zeros_like, params)
    mu, wd = settings.momentum, settings.weight_decay

    def objective(p, st, x, y, k):
        out, st = model.apply(p, st, None, augment(k, x), True)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out.logits, y))
        total = ce + (penalty(p) if penalty is not None else 0.0)
        return total, (st, jnp.sum(jnp.argmax(out.logits, -1) == y))

    @jax.jit
    def step(p, b, st, x, y, k, lr):
        # torch.optim.SGD: d = g + wd p; b = mu b + d; p = p - lr b.
        (loss, (st, correct)), g = jax.value_and_grad(objective, has_aux=True)(p, st, x, y, k)
        b = jax.tree.map(lambda bi, gi, pi: mu * bi + gi + wd * pi, b, g, p)
        p = jax.tree.map(lambda pi, bi: pi - lr * bi, p, b)
        return p, b, st, loss, correct

    @jax.jit
    def score(p, st, x, y):
        out, _ = model.apply(p, st, None, x, False)
        return jnp.sum(jnp.argmax(out.logits, -1) == y)

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "settings.json", asdict(settings))
        (out_dir / "log.jsonl").write_text("")
    history, best = [], -1.0
    n, bsz = len(y_train), settings.batch_size
    for epoch in range(settings.epochs):
        start = time.perf_counter()
        lr = cosine_lr(settings.lr, epoch, settings.epochs)
        perm = np.random.RandomState(settings.seed + 1 + epoch).permutation(n)
        total_loss, correct = 0.0, 0
        batches = range(0, n, bsz)  # the last partial batch is kept (torch's default)
        for i in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{settings.epochs}",
                      disable=quiet, leave=False, dynamic_ncols=True):
            rows = perm[i:i + bsz]
            k = jax.random.fold_in(jax.random.fold_in(key, epoch), i)
            params, buf, state, loss, c = step(params, buf, state, jnp.asarray(x_train[rows]),
                                               jnp.asarray(y_train[rows]), k, lr)
            total_loss += float(loss)
            correct += int(c)
        train_seconds = time.perf_counter() - start
        test_correct = sum(int(score(params, state, jnp.asarray(x_test[j:j + settings.eval_batch]),
                                     jnp.asarray(y_test[j:j + settings.eval_batch])))
                           for j in range(0, len(y_test), settings.eval_batch))
        record = {"epoch": epoch, "lr": lr, "loss_sum": total_loss,
                  "loss": total_loss / len(batches), "train_acc": correct / n,
                  "test_acc": test_correct / len(y_test), "train_seconds": train_seconds,
                  "seconds": time.perf_counter() - start}
        if on_epoch is not None:
            record.update(on_epoch(epoch, params, state, record))
        history.append(record)
        if out_dir is not None:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if record["test_acc"] > best:
                best = record["test_acc"]
                save_params(out_dir / "best.npz", params)
        if not quiet:
            print(f"{desc} epoch {epoch}: loss {record['loss']:.4f} train acc "
                  f"{record['train_acc']:.4f} test acc {record['test_acc']:.4f} "
                  f"({record['seconds']:.0f} s)", flush=True)
        if total_loss >= ABORT_LOSS:
            print(f"{desc}: stopped, summed training loss {total_loss:.3g} >= {ABORT_LOSS:g}")
            break
    return history
