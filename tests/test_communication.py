"""Upload precision: bytes are counted at the sent size, the server gets float32 back."""

import json

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import small_engine
from utils.pytree import cast_floats
from utils.rundir import RunDir


def _rounds(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_uploads_halve_bytes_and_stay_close(tmp_path, dtype):
    runs = {}
    for name in ("float32", dtype):
        small_engine("fedeq", rounds=1, run_dir=RunDir(tmp_path / name),
                     upload_dtype=name).run()
        runs[name] = _rounds(tmp_path / name)
    for full, half in zip(runs["float32"], runs[dtype], strict=True):
        assert half["up_bytes"] * 2 == full["up_bytes"]
        assert half["down_bytes"] == full["down_bytes"]      # downloads stay float32
        assert half["test_acc"] == pytest.approx(full["test_acc"], abs=0.05)
    assert runs["float32"][-1]["train_loss"] != runs[dtype][-1]["train_loss"], \
        "rounding the uploads should change the numbers a little"


def test_cast_floats_keeps_integer_leaves():
    tree = {"w": jnp.ones(3), "count": jnp.asarray(4, jnp.int32)}
    out = cast_floats(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["count"].dtype == jnp.int32
    assert jax.tree.structure(out) == jax.tree.structure(tree)
