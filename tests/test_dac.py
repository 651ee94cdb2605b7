"""DAC: the MobileNet-V2 and its exact cost counter, the gate regulariser and pruning
rule, the snapshot file and budget rule, DAC's splits, channel cut/paste, and the
channel-tier federation on the shared engine (tiny widths, 8 x 8 images)."""

import json
import math
from dataclasses import replace

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.dac import dac_partition
from data.errors import DataError
from data.federated import ClientSplit, FederatedData
from models.mobilenet_v2 import (
    FULL,
    FULL_BLOCKS,
    Depthwise3x3,
    MobileNetConfig,
    channel_layout,
    count_macs,
    count_params,
    mobilenet_v2,
    peak_feature_map,
)
from models.registry import build_mobilenet
from trainers.algorithms.base import HParams
from trainers.channel_setup import (
    ChannelTier,
    build_channel_federation,
    parse_budgets,
    server_config,
    tier_channels,
    width_tiers,
)
from trainers.dac.gates import (
    bound_term,
    entropy_term,
    gate_penalty,
    pruned_config,
    surviving_channels,
)
from trainers.dac.snapshots import Snapshot, read_snapshots, select_snapshot, write_snapshots
from trainers.engine import Engine, RunConfig
from trainers.local import Schedule, random_epoch_count
from trainers.registry import AlgorithmOptions, build_algorithm
from trainers.submodels import ChannelView, module_names
from trainers.task import ClassificationTask

E40 = (8, 20, 52, 98, 111, 93, 57, 189, 182, 27, 146, 95, 8, 147, 115, 8, 266)
E195 = (8, 15, 55, 66, 81, 59, 27, 119, 72, 8, 58, 39, 8, 56, 95, 8, 215)


def _trainable(cfg: MobileNetConfig, gated: bool = False, image: int = 32) -> int:
    model = hk.transform_with_state(mobilenet_v2(10, cfg, gated))
    params, _ = jax.eval_shape(lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0),
                               jnp.zeros((2, image, image, 3)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


# ------------------------------------------------------------------ model and cost
def test_full_model_counts_are_the_specs():
    assert count_params() == 2_296_922
    assert count_macs() == 94_604_800
    assert peak_feature_map() == 147_456
    assert _trainable(FULL) == 2_296_922      # the Haiku model has exactly these


@pytest.mark.parametrize("wm,params,macs,peak", [
    (0.75, 1_402_586, 64_357_120, 147_456), (0.5, 715_834, 30_726_144, 98_304),
    (0.35, 416_698, 17_539_584, 49_152)])
def test_width_multiplier_counts_are_the_specs(wm, params, macs, peak):
    cfg = MobileNetConfig.width_multiplier(wm)
    assert count_params(cfg) == params and _trainable(cfg) == params
    assert round(count_macs(cfg) / 1e4) == round(macs / 1e4)   # spec: 64.36 M, 30.73 M ...
    assert peak_feature_map(cfg) == peak


@pytest.mark.parametrize("expansions,macs,params", [
    (E40, 34_016_800, 835_592), (E195, 26_228_512, 714_059),
    ((8, 16, 54, 67, 82, 59, 28, 118, 72, 8, 58, 39, 8, 57, 95, 8, 215), 26_291_152, 714_434)])
def test_searched_configurations_reproduce_the_snapshot_file(expansions, macs, params):
    cfg = MobileNetConfig.from_expansions(expansions)
    assert (count_macs(cfg), count_params(cfg)) == (macs, params)
    assert _trainable(cfg) == params


def test_one_pruned_block_counted_by_hand():
    """Block 0 narrowed from 32 to 8 expanded channels (32 -> 8 -> 16, 32 x 32, with a
    projection): params 32*8 + 9*8 + 8*16 + 4*8 + 2*16 fewer by the removed part."""
    e = list(FULL.expansions)
    e[0] = 8
    cfg = MobileNetConfig.from_expansions(e)
    full_block = 32 * 32 + 9 * 32 + 32 * 16 + 4 * 32 + 2 * 16
    small_block = 32 * 8 + 9 * 8 + 8 * 16 + 4 * 8 + 2 * 16
    assert count_params(FULL) - count_params(cfg) == full_block - small_block
    hw = 32 * 32
    full_macs = (32 * 32 + 9 * 32 + 32 * 16 + 2 * (32 + 32 + 16)) * hw
    small_macs = (32 * 8 + 9 * 8 + 8 * 16 + 2 * (8 + 8 + 16)) * hw
    assert count_macs(FULL) - count_macs(cfg) == full_macs - small_macs


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_shifts_equal_haikus_grouped_convolution(stride):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 5))
    ours = hk.without_apply_rng(hk.transform(lambda v: Depthwise3x3(stride, name="d")(v)))
    ref = hk.without_apply_rng(hk.transform(lambda v: hk.DepthwiseConv2D(
        1, 3, stride=stride, padding=((1, 1), (1, 1)), with_bias=False, name="d")(v)))
    params = ref.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5,
                               atol=1e-5)


def test_gates_at_one_change_nothing():
    """A gated block with its gates at their initial 1 computes what the gate-free block
    does with the same weights (one block: the whole net only compiles longer)."""
    from models.mobilenet_v2 import InvertedResidual
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 16))

    def block(gated):
        return hk.transform_with_state(lambda v, t: InvertedResidual(
            16, 48, 16, 1, gated, name="block00")(v, t))

    params, state = block(True).init(jax.random.PRNGKey(0), x, True)
    assert np.all(params["block00"]["gate"] == 1.0)
    bare = {k: v for k, v in params.items() if k != "block00"}
    for training in (True, False):
        a, _ = block(True).apply(params, state, None, x, training)
        b, _ = block(False).apply(bare, state, None, x, training)
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ gates and pruning
def test_entropy_and_bound_terms_by_hand():
    w = jnp.asarray([-0.5, 0.2, 1.0, 1.75])
    p = np.exp(np.asarray(w)) / np.exp(np.asarray(w)).sum()
    assert float(entropy_term(w)) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert float(bound_term(w)) == pytest.approx(0.5 + 0.75)
    uniform = jnp.ones(7)
    assert float(entropy_term(uniform)) == pytest.approx(np.log(7), rel=1e-6)
    params = {f"block{b:02d}": {"gate": jnp.ones(e)} for b, (e, _, _) in enumerate(FULL_BLOCKS)}
    params["block03"]["gate"] = w.tolist() + [1.0] * 140
    params["block03"]["gate"] = jnp.asarray(params["block03"]["gate"])
    want = sum(np.log(e) for b, (e, _, _) in enumerate(FULL_BLOCKS) if b != 3)
    want += float(entropy_term(params["block03"]["gate"])) + 0.1 * 1.25
    assert float(gate_penalty(params)) == pytest.approx(0.1 * want, rel=1e-5)


def test_pruning_respects_threshold_and_floor():
    w = np.ones(20)
    w[[1, 4, 7]] = [0.05, -0.09, 0.1]           # |w| < 0.1 removed; 0.1 itself stays
    assert surviving_channels(w).tolist() == [i for i in range(20) if i not in (1, 4)]
    tiny = np.full(12, 0.01)
    tiny[[2, 5, 9]] = [0.02, 0.5, -0.03]
    kept = surviving_channels(tiny)               # 1 survives; the floor keeps 8
    assert len(kept) == 8 and 5 in kept and 9 in kept and 2 in kept
    params = {f"block{b:02d}": {"gate": jnp.ones(e)} for b, (e, _, _) in enumerate(FULL_BLOCKS)}
    params["block16"]["gate"] = params["block16"]["gate"].at[:900].set(0.0)
    cfg, channels = pruned_config(params)
    assert cfg.expansions[16] == 60 and channels[16] == list(range(900, 960))
    assert cfg.expansions[:16] == FULL.expansions[:16]


# ------------------------------------------------------------------ snapshots, budgets
def _snapshots() -> list[Snapshot]:
    out = []
    for epoch, e in (("0", FULL.expansions), ("40", E40), ("195", E195)):
        cfg = MobileNetConfig.from_expansions(e)
        out.append(Snapshot(epoch, count_macs(cfg), count_params(cfg), cfg))
    return out


def test_budget_rule_on_a_snapshot_file(tmp_path):
    path = tmp_path / "snaps.json"
    write_snapshots(path, _snapshots())
    assert [p.name for p in tmp_path.iterdir()] == ["snaps.json"]   # no temporary left
    snaps = read_snapshots(path)
    assert [s.epoch for s in snaps] == ["0", "40", "195"]
    assert select_snapshot(snaps, 1e9, 1e9).epoch == "0"           # first that fits
    # strict: a budget equal to the full model's figures selects the next one
    assert select_snapshot(snaps, 94_604_800, 2_296_923).epoch == "40"
    assert select_snapshot(snaps, 40e6, 800_000).epoch == "195"     # params decide
    with pytest.raises(DataError, match="smallest is epoch 195: 26,228,512 MACs"):
        select_snapshot(snaps, 26_228_512, 1e9, path)


def test_malformed_snapshot_files_are_data_errors(tmp_path):
    path = tmp_path / "s.json"
    for text in ("", "{", "[]", "{}", '{"0": {"macs": 1}}', '{"0": {"macs": 1, "params": 2, '
                 '"cfg": [[1, 2, 1]]}}', json.dumps({"0": {**_snapshots()[0].to_json(),
                                                          "channels": [[0]] * 17}})):
        path.write_text(text)
        with pytest.raises(DataError):
            read_snapshots(path)
    with pytest.raises(DataError, match="no such file"):
        read_snapshots(tmp_path / "missing.json")


def test_parse_budgets():
    assert parse_budgets("1:2, 3e6:inf") == [(1.0, 2.0), (3e6, math.inf)]
    for bad in ("", "1", "1:2:3", "a:b"):
        with pytest.raises(ValueError):
            parse_budgets(bad)


# ------------------------------------------------------------------ DAC's splits
def test_dac_splits():
    labels = np.repeat(np.arange(10), 5000)
    iid = dac_partition(labels, 8, "dac-iid", 0)
    assert [len(p) for p in iid] == [6250] * 8
    assert len(np.unique(np.concatenate(iid))) == 50_000
    shards = dac_partition(labels, 16, "dac-shards", 0)
    assert all(len(p) == 400 and len(np.unique(labels[p])) <= 2 for p in shards)
    assert len(np.unique(np.concatenate(shards))) == 16 * 400
    again = dac_partition(labels, 16, "dac-shards", 0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    with pytest.raises(ValueError, match="at most 125 clients"):
        dac_partition(labels, 126, "dac-shards", 0)


def test_random_epochs_mask_whole_epochs():
    counts = {int(random_epoch_count(jax.random.PRNGKey(s), 5)) for s in range(60)}
    assert counts == {1, 2, 3, 4, 5}
    sched = Schedule(jnp.zeros((5, 3, 2), jnp.int32), jnp.ones((5, 3, 2), bool))
    kept = sched.first_epochs(jnp.asarray(2)).mask
    assert kept[:2].all() and not kept[2:].any()


# ------------------------------------------------------------------ channel views
def _random_like(shapes, seed):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rs.randn(*s.shape), s.dtype), shapes)


def _shapes(cfg):
    model = hk.transform_with_state(mobilenet_v2(10, cfg))
    return jax.eval_shape(lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0),
                          jnp.zeros((2, 8, 8, 3)))


def test_channel_cut_then_paste_is_identity_on_owned_entries():
    rs = np.random.RandomState(0)
    full = MobileNetConfig.width_multiplier(0.5)
    keep = [np.sort(rs.choice(e, max(e // 3, 8), replace=False)) for e in full.expansions]
    small = ChannelTier("s", MobileNetConfig(full.stem, tuple(
        (len(k), out, s) for k, (_, out, s) in zip(keep, full.blocks, strict=True)),
        full.final), tuple(tuple(k) for k in keep), "test")
    server_cfg, unions = server_config([small, ChannelTier("f", full, None, "full")])
    assert server_cfg == full
    params, state = _random_like(_shapes(full), 0)
    small_shapes = _shapes(small.config)
    view = ChannelView(module_names(*small_shapes), module_names(params, state),
                       channel_layout(full), tier_channels(small, full, unions))
    cut = view.cut({"params": params, "state": state})
    assert jax.tree.map(lambda a: a.shape, cut) == jax.tree.map(
        lambda a: a.shape, {"params": small_shapes[0], "state": small_shapes[1]})
    b = 5
    name = f"block{b:02d}/~/expand_conv"
    np.testing.assert_array_equal(cut["params"][name]["w"], params[name]["w"][..., keep[b]])
    changed = jax.tree.map(lambda a: a + 1, cut)
    pasted = view.paste({"params": params, "state": state}, changed)
    masks = view.masks({"params": params, "state": state})
    for tree in ("params", "state"):
        for leaf_p, leaf_n, leaf_m in zip(jax.tree.leaves({"params": params, "state": state}[tree]),
                                          jax.tree.leaves(pasted[tree]),
                                          jax.tree.leaves(masks[tree]), strict=True):
            m = np.broadcast_to(np.asarray(leaf_m), leaf_p.shape).astype(bool)
            np.testing.assert_array_equal(np.asarray(leaf_n)[~m], np.asarray(leaf_p)[~m])
            np.testing.assert_array_equal(np.asarray(leaf_n)[m], np.asarray(leaf_p)[m] + 1)
    again = view.paste(params, view.cut(params))
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_every_tiers_masks_have_one_shape_per_leaf():
    """A cohort mixing tiers stacks their masks: a narrow tier that lacks a module (at
    width 0.35 block 1's projection becomes an identity) must still give that leaf a
    mask of the common shape, all zeros."""
    tiers = width_tiers([0.35, 1.0])
    server_cfg, unions = server_config(tiers)
    params, state = _shapes(server_cfg)
    universe = module_names(params, state)
    masks = []
    for tier in tiers:
        view = ChannelView(module_names(*_shapes(tier.config)), universe,
                           channel_layout(server_cfg), tier_channels(tier, server_cfg, unions))
        masks.append(view.masks({"params": params, "state": state}))
    shapes = [jax.tree.map(lambda m: np.shape(m), m) for m in masks]
    assert shapes[0] == shapes[1]
    small, full = masks
    assert "block01/~/shortcut_conv" not in _shapes(tiers[0].config)[0]
    assert float(np.max(small["params"]["block01/~/shortcut_conv"]["w"])) == 0.0
    assert float(np.min(full["params"]["block01/~/shortcut_conv"]["w"])) == 1.0
    stem = np.asarray(small["params"]["stem_conv"]["w"]).reshape(-1)
    assert stem.sum() == tiers[0].config.stem and stem[:tiers[0].config.stem].all()


# ------------------------------------------------------------------ federation
def _data(num_clients=4, seed=0):
    rs = np.random.RandomState(seed)

    def split(n):
        return ClientSplit(rs.randn(n, 8, 8, 3).astype(np.float32),
                           rs.randint(0, 10, n).astype(np.int32))
    train = [split(8) for _ in range(num_clients)]
    return FederatedData("toy", train, train, [], [], [str(i) for i in range(num_clients)],
                         [], 10, (8, 8, 3), global_test=split(16))


SGD = HParams(lr=0.05, local_epochs=1, momentum=0.5, weighted=False)
RUN = RunConfig(num_rounds=1, seed=3, clients_per_round=0.5, batch_size=4, executor="loop",
                quiet=True, global_eval_batch=8, global_eval_drop_last=False)


def _federation(tiers, data, tasks=None):
    tasks = tasks or [ClassificationTask(build_mobilenet(t.config, 10, t.name)) for t in tiers]
    server = ClassificationTask(build_mobilenet(server_config(tiers)[0], 10, "server"))
    alg = build_channel_federation("heteroavg", tiers, tasks, server, SGD, AlgorithmOptions(),
                                   data.num_clients, jnp.asarray(data.train[0].x[:2]))
    return Engine(data, server, alg, RUN)


def test_mixed_federation_at_one_budget_equals_fedavg():
    """Every client at the same (full) budget: the channel federation is FedAvg, number
    for number (the same compiled arithmetic on the same cohorts and keys)."""
    data = _data()
    tier = width_tiers([0.35])[0]
    # One task for both: the compiled training step is shared (and so is the arithmetic).
    task = ClassificationTask(build_mobilenet(tier.config, 10, tier.name))
    fed_engine = _federation([tier], data, [task])
    fed_engine.run()
    plain = build_algorithm("fedavg", task, SGD)
    plain.integer_mean = "trunc"
    fedavg = Engine(data, task, plain, replace(RUN, eval_train_every=0,
                                               reference_losses=False))
    fedavg.run()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 fed_engine.final_server, fedavg.final_server)


@pytest.mark.slow
def test_mixed_federation_averages_each_channel_over_its_owners():
    """Two width tiers: after a round whose cohort holds only the narrow tier, the
    channels only the wide tier owns are unchanged and the shared ones moved."""
    data = _data()
    tiers = width_tiers([0.35, 0.5])
    engine = _federation(tiers, data)
    alg = engine.alg
    x = jnp.asarray(data.train[0].x[:2])
    params, state = engine.task.model.init(jax.random.PRNGKey(0), x)
    server, clients = alg.init(params, state, engine.num_clients)
    cohort = np.asarray([0, 1])
    assert set(alg.tier_of[cohort]) == {0}
    schedule, keys, _ = engine._client_inputs(engine.batcher, cohort, jax.random.PRNGKey(3))
    rows = jnp.asarray(cohort)
    from trainers.local import ClientData
    inputs = (jax.tree.map(lambda a: a[rows], clients),
              ClientData(engine.train[0][rows], engine.train[1][rows]), schedule, keys)
    _, uploads, _ = engine._train_cohort(server, inputs, cohort)
    new = alg.server_update(server, uploads, jnp.ones(2))
    w_old = np.asarray(server["params"]["block05/~/expand_conv"]["w"])
    w_new = np.asarray(new["params"]["block05/~/expand_conv"]["w"])
    cin, e = tiers[0].config.block_inputs()[5], tiers[0].config.blocks[5][0]
    assert not np.allclose(w_new[..., :cin, :e], w_old[..., :cin, :e])
    np.testing.assert_array_equal(w_new[..., e:], w_old[..., e:])
    np.testing.assert_array_equal(w_new[..., cin:, :], w_old[..., cin:, :])
    up = {int(alg.tier_of[c]) for c in cohort}
    assert up == {0}
