"""FeDEQ and baselines: parse flags, build data / model / algorithm, run the engine.

`python main.py` with no flags trains FeDEQ with a small DEQ-MLP on an embedded
synthetic federated dataset (no download) in about a minute on 2 CPU cores.
"""

import contextlib
import datetime
import logging
import os
import sys
import traceback
from collections.abc import Iterator

from absl import app, flags

from data.augment import AUGMENTATIONS
from data.errors import DataError
from data.registry import DATASETS, PARTITIONS
from deq.config import BWD_SOLVERS, FWD_SOLVERS
from models.registry import MODELS
from trainers.engine import RunConfig
from trainers.executors import EXECUTORS
from trainers.names import SUBMODEL_TRAINERS
from trainers.optimizers import OPTIMIZERS
from trainers.registry import TRAINERS
from trainers.run import RepeatFailed
from trainers.sharding import DEVICE_EXECUTORS
from utils.checkpoint import CheckpointError
from utils.distributed import initialize, is_writer, settings_from_env
from utils.input_error import InputError

FLAGS = flags.FLAGS
# Engine settings take their defaults from RunConfig, so library and command line agree.

# The reference's flags (spec 4.1), with its short forms.
flags.DEFINE_string("trainer", "fedeq_vision", f"algorithm: {', '.join(TRAINERS)}")
flags.DEFINE_string("model", None, f"model: {', '.join(MODELS)} (default: the dataset's)",
                    short_name="m")
flags.DEFINE_string("dataset", "synthetic", f"dataset: {', '.join(DATASETS)}", short_name="d")
flags.DEFINE_string("data_dir", "data", "folder holding one sub-folder per dataset")
flags.DEFINE_enum("data_source", "files", ["files", "tfds"], "CIFAR: the official files under "
                  "--data_dir (downloaded there when missing and online), or tensorflow-"
                  "datasets (needs TensorFlow, ~1.4 GB)")
flags.DEFINE_integer("num_clients", None, "clients read (the first ones); default: the "
                     "dataset's (100 FEMNIST, 30 synthetic)", short_name="c")
flags.DEFINE_integer("num_rounds", None, "rounds; num_rounds + 1 are run as in the reference "
                     "(default 400, or 10 on the synthetic data)", short_name="t")
flags.DEFINE_integer("seed", 0, "root seed (the runner scripts use 100)")
flags.DEFINE_float("learning_rate", 0.01, "client SGD learning rate", short_name="lr")
flags.DEFINE_float("l2_reg", 0.0, "L2 coefficient added to client losses")
flags.DEFINE_integer("eval_every", RunConfig.eval_every,
                     "evaluate every this many rounds (and the last)", short_name="ee")
flags.DEFINE_float("clients_per_round", RunConfig.clients_per_round,
                   "fraction of seen clients sampled per round", short_name="cr")
flags.DEFINE_integer("batch_size", RunConfig.batch_size,
                     "client batch size (-1: whole client)", short_name="b")
flags.DEFINE_enum("inner_mode", "epoch", ["epoch"], "local work is counted in epochs "
                  "(the reference's deprecated 'iter' mode is not offered)", short_name="im")
flags.DEFINE_integer("inner_epochs", 5, "E: local / representation epochs", short_name="le")
flags.DEFINE_integer("personalized_epochs", 3, "P: head epochs", short_name="pe")
flags.DEFINE_float("frac_unseen", 0.0, "fraction of clients held out (the last ones)",
                   short_name="fu")
flags.DEFINE_bool("unweighted_updates", False, "uniform instead of sample-weighted averaging")
flags.DEFINE_enum("fwd_solver", "anderson", FWD_SOLVERS, "DEQ forward solver",
                  short_name="fs")
flags.DEFINE_enum("bwd_solver", "normal_cg", BWD_SOLVERS, "DEQ backward solver",
                  short_name="bs")
flags.DEFINE_integer("fwd_maxiter", None, "DEQ forward solver's iteration cap (default: "
                     "the reference's for --fwd_solver: Anderson 20, fpi 20, Broyden 50); "
                     "fewer is faster and not the reference's arithmetic", lower_bound=1)
flags.DEFINE_float("fwd_tol", None, "DEQ forward solver's absolute tolerance (default: the "
                   "reference's: Anderson 1e-3, fpi 1e-2, Broyden 1e-3)", lower_bound=0)
flags.DEFINE_float("rho", 0.01, "FeDEQ ADMM penalty and dual step")
flags.DEFINE_float("lam_admm", 0.01, "FeDEQ initial dual value (text only; vision duals "
                   "start at 0 in the reference, see --fedeq_lam_init_vision)")
flags.DEFINE_float("lambda", 0.3, "Ditto: weight of the proximal term pulling each "
                   "personal model toward the global one")
flags.DEFINE_float("finetune_frac", 0.3, "Finetune: FedAvg runs while round < "
                   "finetune_frac * num_rounds, then sampled clients fine-tune locally")
flags.DEFINE_integer("knn_neighbors", 10, "kNN-Per: neighbours k in each client's datastore")
flags.DEFINE_float("knn_lam", 0.5, "kNN-Per: weight of the kNN distribution in the mixture "
                   "with the global model's softmax", short_name="kl")
flags.DEFINE_integer("labels_per_client", 5, "labels per client for shard partitions",
                     short_name="lpc")
flags.DEFINE_string("outdir", None, "run directory (default logs/<trainer>--<time>--...)",
                    short_name="o")
flags.DEFINE_integer("repeat", 1, "independent runs, seeds seed + 1000 k", short_name="r")
flags.DEFINE_enum("repeat_mode", "in_process", ["in_process", "subprocess"], "run the "
                  "repeats one after another in this process, or each in a fresh Python "
                  "process (nothing shared between repeats: compiled programs, memory, JAX "
                  "state)")
flags.DEFINE_bool("quiet", False, "no progress bar or per-round lines", short_name="q")
flags.DEFINE_alias("client_rate", "clients_per_round")
flags.DEFINE_alias("local_epochs", "inner_epochs")

# Ours.
flags.DEFINE_enum("executor", None, EXECUTORS, "how a cohort's clients run (default: the "
                  "fastest measured on this backend)")
flags.DEFINE_enum("device_executor", None, DEVICE_EXECUTORS, "--executor sharded: what "
                  "runs each device's block of clients (default: loop on CPU, vmap otherwise)")
flags.DEFINE_integer("cpu_devices", None, "expose this many CPU devices in this process "
                     "(XLA's host platform), e.g. to try --executor sharded on one machine")
flags.DEFINE_string("coordinator", None, "several processes (jax.distributed): HOST:PORT of "
                    "process 0, the same for all (or JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_integer("num_processes", None, "several processes: how many (or "
                     "JAX_NUM_PROCESSES); runners/distributed.sh starts them on one machine")
flags.DEFINE_integer("process_id", None, "several processes: this one's index, 0..N-1 (or "
                     "JAX_PROCESS_ID); only process 0 writes files and prints")
flags.DEFINE_integer("eval_train_every", RunConfig.eval_train_every, "score the (large) "
                     "train split only every this many rounds and the last (0: never); other "
                     "rounds log it as NaN / null")
flags.DEFINE_integer("checkpoint_every", RunConfig.checkpoint_every, "write the run's "
                     "whole state every this many rounds (0: only at the end); rerunning the "
                     "same command with the same --outdir continues from it")
flags.DEFINE_enum("upload_dtype", RunConfig.upload_dtype, ["float32", "bfloat16", "float16"],
                  "precision of what clients upload: cast before sending, counted at the "
                  "sent size, cast back to float32 on the server")
flags.DEFINE_bool("rescore_unchanged", RunConfig.rescore_unchanged, "score every seen "
                  "client at every evaluation, also those whose model did not change since "
                  "they were last scored (same numbers, slower)")
flags.DEFINE_bool("reference_losses", RunConfig.reference_losses, "compute the loss the "
                  "reference logs in losses.txt (training-mode BatchNorm over each client's "
                  "whole set: one more forward pass per scored client and split); "
                  "--noreference_losses leaves losses.txt at nan")
flags.DEFINE_integer("eval_chunk", RunConfig.eval_chunk, "examples per evaluation batch "
                     "(each client is padded to a multiple of it)")
flags.DEFINE_enum("anderson_impl", "batched", ["batched", "jaxopt"], "Anderson for the whole "
                  "batch in one loop, or jaxopt's solver vmapped per example (same iterates)")
flags.DEFINE_bool("fast_conv", True, "convolutions XLA:CPU runs fast: the DEQ block's "
                  "hand-written gradient, the explicit ResNets' patch products "
                  "(models/conv2d.py); same numbers to float rounding, --nofast_conv is "
                  "XLA's own")
flags.DEFINE_bool("fedeq_dual_average", False, "textbook consensus ADMM: the server "
                  "averages theta_i + lambda_i / rho (the reference averages theta_i)")
flags.DEFINE_bool("ditto_reference_start", False, "Ditto as the reference runs it: the "
                  "personal phase continues from the freshly trained global copy each round "
                  "(default: the published Ditto, whose personal model persists)")
flags.DEFINE_bool("fedeq_lam_init_vision", False, "start vision duals at --lam_admm, as "
                  "the reference intends but does not do")
# Text (Shakespeare): where the reference's _seq trainers differ from its vision ones. The
# defaults are the reference's (docs/DEVIATIONS.md, "Text (Shakespeare)").
flags.DEFINE_bool("text_sample_with_replacement", True, "text FedAvg draws each round's "
                  "clients with replacement, as the reference's fedavg_seq")
flags.DEFINE_bool("text_uniform_average", True, "text FeDEQ and FedPer average the uploads "
                  "uniformly, as the reference (--notext_uniform_average: weighted by samples "
                  "like their vision versions)")
flags.DEFINE_bool("text_admm_per_token", True, "text FeDEQ divides its ADMM terms by the "
                  "batch's token count, as the reference (effective rho and lambda ~1000x "
                  "smaller)")
flags.DEFINE_bool("text_acc_ignores_padding", False, "text accuracy (and kNN-Per's datastore "
                  "and queries) over non-padding positions only; the reference counts every "
                  "position")
# Clients of unequal compute (InCo Aggregation, docs/inco_spec): sub-models of one server
# model. The runners under runners/inco/ pass the paper's settings.
flags.DEFINE_string("submodels", None, "comma-separated client models, smallest first, "
                    "the server model last (default: the family of --model, e.g. resnet10,"
                    "resnet14,resnet18,resnet22,resnet26); clients are split into equal "
                    "groups of ids, one model per group")
flags.DEFINE_enum("partition", None, PARTITIONS, "how a pooled dataset is cut into clients "
                  "(default: shards for the FeDEQ trainers, hetero-fixed for InCo's)")
flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration of --partition hetero (and the "
                   "alpha the fixed partition file was drawn with)")
flags.DEFINE_string("partition_file", None, "--partition hetero-fixed: the authors' .npy "
                    "(a pickled dict, read without executing anything) or its JSON copy")
flags.DEFINE_enum("augment", "auto", ["auto", *AUGMENTATIONS], "training augmentation on "
                  "device (auto: InCo's per dataset with its partitions, none otherwise)")
flags.DEFINE_enum("optimizer", None, OPTIMIZERS, "client optimiser (default: adam for InCo's "
                  "ResNets, sgd otherwise); fresh every round")
flags.DEFINE_float("momentum", None, "SGD momentum (default 0.9 for InCo's ViT, else 0)")
flags.DEFINE_float("weight_decay", None, "weight decay added to the gradient (default 1e-5 "
                   "for InCo's ViT, else 0)")
flags.DEFINE_float("prox_mu", 0.1, "FedProx: mu of the proximal term mu/2 ||w - w_global||^2 "
                   "(InCo's mu/2 = 0.05)")
flags.DEFINE_float("moon_mu", 0.001, "MOON: weight of the model-contrastive term")
flags.DEFINE_float("moon_temperature", 0.5, "MOON: temperature tau")
flags.DEFINE_enum("inco_mode", "code", ["code", "paper", "none"], "InCo's rule: the released "
                  "code's (default), the paper's Algorithm 1, or none")
flags.DEFINE_float("inco_clamp_max", 5.0, "InCo: cap on the mixing coefficient lambda")
flags.DEFINE_float("inco_clip", 0.1, "InCo: elementwise clip of a mixed update (code rule; "
                   "0: none)")
flags.DEFINE_integer("vit_patch_size", 4, "ViT patch size (the paper: 16 at 224 x 224)")
flags.DEFINE_integer("vit_image_size", 32, "ViT input size; smaller images are resized "
                     "(the paper: 224)")
flags.DEFINE_string("vit_weights", None, "an .npz of ViT-S weights to start from (timm or "
                    "AugReg names); default: from scratch")
flags.DEFINE_bool("global_eval_drop_last", RunConfig.global_eval_drop_last, "InCo: score "
                  "the pooled test set in batches of 512 dropping the last partial one, as "
                  "the authors' loader (9,728 of CIFAR-10's 10,000)")
flags.DEFINE_bool("text_eval_dropout", True, "keep the transformers' dropout on when "
                  "evaluating, as the reference does")
# Clients of different budgets (DAC, docs/dac_spec): MobileNet-V2 channel tiers. The
# runners under runners/dac/ pass DAC's settings.
flags.DEFINE_string("budgets", None, "MACS:PARAMS budgets, comma-separated: one tier per "
                    "budget, each the first snapshot of --dac_snapshots under both (strict); "
                    "one budget is DAC's own federation")
flags.DEFINE_string("dac_snapshots", None, "the search's snapshots.json (or DAC's "
                    "net_cfg.json) that --budgets select from")
flags.DEFINE_list("width_multipliers", None, "HeteroFL's baseline: one tier per width "
                  "multiplier, nested prefixes of the widest (e.g. 0.5,1.0)")
# FeDEQ for clients of unequal compute (trainers/algorithms/deq_tiers.py).
flags.DEFINE_string("tiers", None, "FeDEQ compute tiers: a JSON file or an inline table, "
                    "tiers separated by ';', fields maxiter, tol, bwd_maxiter, width, epochs, "
                    "name (unset: the run's own), e.g. 'maxiter=4;maxiter=10;maxiter=20'")
flags.DEFINE_enum("tier_assignment", "groups", ["groups", "random"], "--tiers: equal groups "
                  "of client ids, first tier first (InCo's), or a seeded random draw")
flags.DEFINE_integer("eval_maxiter", None, "--tiers: also score every client with this "
                     "forward cap (test-time compute), logged as test_at<N>_acc")
flags.DEFINE_bool("random_epoch", False, "DAC's --random_epoch: each client trains E_c "
                  "local epochs, uniform on floor(E/3)..E")


def _default_model(dataset: str, trainer: str) -> str:
    if trainer in SUBMODEL_TRAINERS:
        return "resnet26"
    deq = trainer.startswith("fedeq")
    return {"synthetic": "deq_mlp", "femnist": "deq_resnet_s" if deq else "resnet20",
            "cifar10": "deq_resnet_m" if deq else "resnet34",
            "cifar100": "deq_resnet_m" if deq else "resnet34",
            "shakespeare": "deq_transformer" if deq else "transformer8"}.get(dataset, "resnet26")


def _outdir(trainer: str, dataset: str, num_clients: int, model: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d--%H-%M-%S")
    return os.path.join("logs", f"{trainer}--{stamp}--{dataset}-{num_clients}-{model}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise InputError(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a "
                         f"flag (--name=value), see python main.py --helpshort")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    # Before JAX touches a device: forced CPU devices, then the other processes.
    initialize(*settings_from_env(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id),
               cpu_devices=FLAGS.cpu_devices)
    from trainers.run import RunRequest, run_repeats

    # Process 0 alone prints the run's output (errors still reach stderr everywhere).
    with contextlib.ExitStack() as stack:
        if not is_writer():
            stack.enter_context(contextlib.redirect_stdout(
                stack.enter_context(open(os.devnull, "w"))))
        request = RunRequest.from_flags(FLAGS, _default_model, _outdir)
        run_repeats(request)


# ---------------------------------------------------------------- what reaches the user
# The project's own input errors: a flag or flags that cannot run together (InputError),
# missing or malformed data files (DataError), a checkpoint the run cannot resume from
# (CheckpointError). Each is printed as one line, `error: ...`, and exits with status 2,
# with no traceback unless --verbosity=1 or FEDEQ_TRACEBACK=1 asks for one. Any other
# exception is a bug and surfaces as Python's traceback (exit status 1).
INPUT_ERRORS = (InputError, DataError, CheckpointError)
TRACEBACK_ENV = "FEDEQ_TRACEBACK"
EXIT_INPUT_ERROR = 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with its errors (a bad enum value, a non-number) as input errors."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        raise InputError(f"{err}; see python main.py --helpshort") from err


def _traceback_wanted() -> bool:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    return FLAGS.is_parsed() and FLAGS.verbosity >= 1


@contextlib.contextmanager
def reported_input_errors() -> Iterator[None]:
    """The one place where input errors become the user's `error: ...` line and status."""
    try:
        yield
    except RepeatFailed as err:
        if err.code != EXIT_INPUT_ERROR:
            print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)  # code 2: the repeat printed its own error line
    except INPUT_ERRORS as err:
        if _traceback_wanted():
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    with reported_input_errors():
        app.run(main, flags_parser=parse_flags)
