"""The trainer's configuration: command-line flags, an optional YAML/JSON file, validation.

Precedence, lowest first: built-in defaults, the ``--demo`` preset, the ``--config`` file, flags on
the command line. Values that depend on the data or the method (epochs, batch size, learning rate,
temperature, ...) default to ``None`` here and are resolved by :func:`resolve` -- the papers'
values for real data, scaled-down values for the embedded digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("scratch", "kd", "cd", "dih", "feed", "nd", "topk")
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
LOSS_BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any training starts."""


@dataclass
class Config:
    # What to run.
    method: str | None = None
    demo: bool = False
    demo_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    demo_methods: list[str] = field(default_factory=lambda: list(METHODS))
    # Data and models.
    data: str | None = None
    synthetic_images: int = 12800
    synthetic_classes: int = 1000
    train_fraction: float = 1.0
    image_size: int = 224
    teacher: str | None = None
    student: str | None = None
    teacher_weights: list[str] = field(default_factory=list)
    teacher_epochs: int | None = None
    cache_dir: str | None = None
    # Optimisation.
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    lr_scaling: str = "none"
    lr_base_batch: int = 256
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    # Method hyper-parameters (None: the method's default).
    temperature: float | None = None
    alpha: float | None = None
    cd_weight: float = 6.0
    cd_decay: float = 0.9
    cd_decay_every: int | None = None
    cd_kd_start: int | None = None
    cd_ce_weight: float = 1.0
    cd_gkd_weight: float = 1.0
    dih_head_epochs: int | None = None
    dih_head_lr: float | None = None
    feed_teachers: int = 2
    feed_beta: float = 500.0
    nd_block_epochs: int | None = None
    topk: int = 3
    # Speed and scale.
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    channels_last: bool | None = None
    workers: int | None = None
    threads: int | None = None
    loss_backend: str = "auto"
    max_steps_per_epoch: int | None = None
    profile_steps: int = 0
    # Output and reliability.
    output: str | None = None
    overwrite: bool = False
    resume: str | None = None
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    log_interval: int = 20
    eval_every: int = 1
    plot: bool = True
    progress: bool | None = None
    config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that do not change what a run computes: a resumed run may set them differently.
RUNTIME_FIELDS = frozenset({
    "demo", "demo_seeds", "demo_methods", "cache_dir", "device", "workers", "threads",
    "profile_steps", "output", "overwrite", "resume", "checkpoint_every", "stop_after_steps",
    "log_interval", "progress", "config", "compile", "loss_backend", "plot",
})

SYNTHETIC = "synthetic"
BUILTIN_TEACHER = "digits-teacher"
BUILTIN_STUDENT = "digits-student"

# The --demo preset: a small transfer set (10 % of the digits' training split, 126 images) leaves
# the student short of data, which is where a teacher's soft targets help. The teacher is trained
# on the whole training split (it stands for a model pretrained on more data than the student sees).
# Scratch plateaus by epoch 15 and every method by epoch 25 (demo.png), so 30 epochs suffice;
# validating every 5th epoch keeps the 540-image validation pass from dominating the run time.
DEMO_PRESET: dict[str, Any] = {
    "train_fraction": 0.1,
    "epochs": 30,
    "batch_size": 32,
    "eval_every": 5,
    "output": "runs/demo",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting, so file values and flags fail the same way."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fastkd.train",
        description=(
            "Distil a student from a teacher with fastkd's fused losses. With only --method it "
            "runs on the embedded data (scikit-learn's handwritten digits, no download): it trains "
            "the built-in teacher once, caches it, and distils the built-in student. With --data "
            "DIR it reads an ImageNet-layout folder and uses torchvision models. --demo runs the "
            "main job: scratch and every distillation method over 3 seeds on the embedded data, "
            "a table and a plot. Hyper-parameters default to the papers' values (fastkd's "
            "PAPERS.md); on the embedded data, epoch counts are scaled down and epoch boundaries "
            "scaled with them."
        ),
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--method", choices=METHODS, help=(
        "scratch: student alone, cross-entropy. kd: Hinton KD (T, alpha). cd: channel distillation "
        "with 1x1 connectors at 4 stages + guided KD + early-decay teacher. dih: train one linear "
        "head per teacher stage (teacher frozen), then distil from the cohort of heads + teacher. "
        "feed: parallel FEED, one non-linear transform per teacher on the student's last feature "
        "map, normalised-L1 loss. nd: neighbourhood distillation, student stages trained "
        "independently against the teacher's, then stacked and fine-tuned with KD. topk: partial "
        "teacher, top-k probabilities kept, the rest spread uniformly."))
    g.add_argument("--demo", action="store_true", help=(
        "The main job: on the embedded data, train (or load the cached) teacher, train the student "
        "with every --demo-methods over --demo-seeds, print accuracy mean +- std, time and "
        "images/s per method, write demo.csv/demo.json/demo.png under --output. Preset: "
        + ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items()) + "."))
    g.add_argument("--demo-seeds", type=int, nargs="+", help="seeds of the demo's runs")
    g.add_argument("--demo-methods", nargs="+", choices=METHODS, help="methods the demo runs")
    g.add_argument("--config", metavar="FILE", help=(
        "YAML or JSON file of option values (keys as the long flags, with - or _); flags given on "
        "the command line override it"))

    g = p.add_argument_group("data and models")
    g.add_argument("--data", metavar="DIR", help=(
        "ImageNet-layout folder with train/<class>/ and val/<class>/ read with torchvision's "
        "ImageFolder (RandomResizedCrop + flip for train, resize + center crop for val, ImageNet "
        "normalisation). 'synthetic': random ImageNet-shaped tensors for throughput "
        "measurements (teacher weights optional there). Default: the embedded digits (1797 8x8 "
        "images, 10 classes, fixed 70/30 train/val split)"))
    g.add_argument("--synthetic-images", type=_positive_int, help=(
        "--data synthetic: training images per epoch (validation: a tenth as many)"))
    g.add_argument("--synthetic-classes", type=_positive_int, help="--data synthetic: classes")
    g.add_argument("--train-fraction", type=float, help=(
        "embedded data: fraction of the training split the student trains on (a fixed stratified "
        "subset); the teacher always trains on the whole split"))
    g.add_argument("--image-size", type=_positive_int, help=(
        "--data: training crop size; validation resizes to size*256/224 and center-crops size"))
    g.add_argument("--teacher", help=(
        f"teacher model: '{BUILTIN_TEACHER}' (embedded data) or a torchvision classification "
        "model name such as resnet34 (built with weights=None). Default: the built-in teacher on "
        "the embedded data; required with --data"))
    g.add_argument("--student", help=(
        f"student model: '{BUILTIN_STUDENT}' (embedded data) or a torchvision model name such as "
        "resnet18 (random init). Default: the built-in student; required with --data"))
    g.add_argument("--teacher-weights", nargs="+", metavar="PATH", help=(
        "teacher weights: a state_dict file (torchvision key names), a fastkd checkpoint or a "
        "fastkd student.pt; several paths for feed (one per teacher). Never downloaded. Required "
        "with --data for every method but scratch; on the embedded data, without it the teacher "
        "is trained once and cached"))
    g.add_argument("--teacher-epochs", type=_positive_int, help=(
        "embedded data: epochs to train the built-in teacher when it is not cached (default 15, "
        "about 99%% validation accuracy)"))
    g.add_argument("--cache-dir", metavar="DIR", help=(
        "where trained embedded teachers are cached, keyed by their recipe and seed (default "
        "$FASTKD_CACHE, else $XDG_CACHE_HOME/fastkd, else ~/.cache/fastkd)"))

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, help=(
        "epochs of the student's training (for nd: block-wise phase + fine-tuning; dih's "
        "head training comes before them); default 30 on the embedded data, 100 with --data "
        "(the CD paper's ImageNet recipe)"))
    g.add_argument("--batch-size", type=_positive_int, help=(
        "global batch size, split evenly over the ranks (default 64 embedded, 256 with --data)"))
    g.add_argument("--lr", type=float, help=(
        "peak learning rate (default 0.05 embedded, 0.1 with --data); with --lr-scaling linear "
        "it is the rate at --lr-base-batch"))
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=(
        "sgd (momentum, nesterov off), adamw, or the large-batch optimizers lars / lamb from timm"))
    g.add_argument("--momentum", type=float, help="SGD/LARS momentum")
    g.add_argument("--weight-decay", type=float, help=(
        "weight decay on weights of rank >= 2 (biases and norm parameters are not decayed); "
        "default 5e-4 embedded, 1e-4 with --data"))
    g.add_argument("--lr-schedule", choices=SCHEDULES, help=(
        "after warm-up: cosine to 0, step (x --lr-gamma at --lr-milestones), or constant"))
    g.add_argument("--lr-milestones", type=int, nargs="+", help=(
        "step schedule: epochs at which the rate is multiplied by --lr-gamma (CD paper: 30 60 90)"))
    g.add_argument("--lr-gamma", type=float, help="step schedule factor")
    g.add_argument("--lr-scaling", choices=("none", "linear"), help=(
        "linear: lr = --lr * global batch / --lr-base-batch (the large-batch recipe, with "
        "--warmup-epochs and --optimizer lars or lamb)"))
    g.add_argument("--lr-base-batch", type=_positive_int, help="reference batch of --lr-scaling")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0, in epochs")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of every CE term")
    g.add_argument("--seed", type=int, help="seed of initialisation, data order, augmentation")

    g = p.add_argument_group("method hyper-parameters")
    g.add_argument("--temperature", type=float, help=(
        "KD temperature T (default: kd/topk/nd 4, cd 1 (GKD), dih 5)"))
    g.add_argument("--alpha", type=float, help=(
        "weight of the KD term, 1-alpha on CE (default: kd/topk/nd 0.9, dih 0.1)"))
    g.add_argument("--cd-weight", type=float, help="cd: initial channel-attention loss weight")
    g.add_argument("--cd-decay", type=float, help="cd: early-decay-teacher factor")
    g.add_argument("--cd-decay-every", type=_positive_int, help=(
        "cd: epochs between decays of the CD weight (default 30%% of --epochs: 30 of 100)"))
    g.add_argument("--cd-kd-start", type=_non_negative_int, help=(
        "cd: CE and guided KD are off for epochs <= this (a CD-only warm-up; default 30%% of "
        "--epochs: 30 of 100)"))
    g.add_argument("--cd-ce-weight", type=float, help="cd: CE weight after the warm-up")
    g.add_argument("--cd-gkd-weight", type=float, help="cd: guided-KD weight after the warm-up")
    g.add_argument("--dih-head-epochs", type=_positive_int, help=(
        "dih: epochs training the intermediate heads on the frozen teacher (default 30%% of "
        "--epochs)"))
    g.add_argument("--dih-head-lr", type=float, help=(
        "dih: peak learning rate of the head training (default --lr / 10: a linear layer on an "
        "unnormalised early stage map, e.g. 2048 inputs on the digits, diverges at --lr)"))
    g.add_argument("--feed-teachers", type=_positive_int, help=(
        "feed, embedded data: number of teachers (differently seeded built-in teachers); with "
        "--data the count of --teacher-weights"))
    g.add_argument("--feed-beta", type=float, help="feed: weight of the normalised-L1 loss")
    g.add_argument("--nd-block-epochs", type=_positive_int, help=(
        "nd: of the --epochs, those training the student stages independently (default 50%%); "
        "the rest fine-tune the stacked student end to end with KD"))
    g.add_argument("--topk", type=_positive_int, help="topk: teacher probabilities kept per row")

    g = p.add_argument_group("speed and scale")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help=(
        "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU"))
    g.add_argument("--amp", nargs="?", const="bf16", choices=AMP_MODES, help=(
        "mixed precision: bf16 autocast (on the CPU too, where it is correct but rarely faster), "
        "fp16 autocast with a gradient scaler (GPU only), off; auto: bf16 on CUDA, off on the "
        "CPU. '--amp' alone means bf16"))
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help=(
        "torch.compile the teacher and the trained modules"))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help=(
        "channels_last memory format for models and images (default: on for CUDA, off on CPU)"))
    g.add_argument("--workers", type=_non_negative_int, help=(
        "DataLoader worker processes per rank (default 0 for the in-memory digits, "
        "min(8, cpus per rank) with --data)"))
    g.add_argument("--threads", type=_positive_int, help=(
        "torch intra-op threads per process (default: 1 on the embedded data, whose tiny "
        "convolutions gain nothing from threads; with --data torch's choice, or cpus / ranks "
        "under torchrun on the CPU)"))
    g.add_argument("--loss-backend", choices=LOSS_BACKENDS, help=(
        "backend of fastkd's losses; 'torch' is fastkd's plain-PyTorch reference (eager losses, "
        "for comparisons)"))
    g.add_argument("--max-steps-per-epoch", type=_positive_int, help=(
        "cap on steps per epoch (quick runs, benchmarks)"))
    g.add_argument("--profile-steps", type=_non_negative_int, help=(
        "time the first N steps section by section (data, teacher forward, student forward, "
        "distillation losses, backward + step), synchronising the device; prints the split and "
        "writes profile.json, then training continues"))

    g = p.add_argument_group("output and reliability")
    g.add_argument("--output", metavar="DIR", help=(
        "directory for checkpoint.pt, student.pt, metrics.csv/json, plot.png, tb/ (default "
        "runs/<method>-seed<seed>)"))
    g.add_argument("--overwrite", action="store_true", help=(
        "start afresh even if --output holds a checkpoint (it is replaced)"))
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH", help=(
        "continue from a checkpoint (default <output>/checkpoint.pt) exactly where it stopped; "
        "the configuration must match the checkpoint's"))
    g.add_argument("--checkpoint-every", type=_non_negative_int, help=(
        "also checkpoint every N optimizer steps (0: only at epoch ends)"))
    g.add_argument("--stop-after-steps", type=_positive_int, help=(
        "checkpoint and stop after N optimizer steps of this process (time-boxed or preemptible "
        "jobs; continue with --resume)"))
    g.add_argument("--log-interval", type=_positive_int, help=(
        "steps between progress-bar updates (and, on GPU, non-finite-loss checks)"))
    g.add_argument("--eval-every", type=_positive_int, help=(
        "validate every N epochs (and after each phase's last epoch); metrics rows of the other "
        "epochs have empty validation columns"))
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, help=(
        "write plot.png (accuracy and loss curves) at the end of the run"))
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help=(
        "tqdm progress bars on rank 0 (default: when stderr is a terminal)"))
    # Every default comes from Config; None on the parser means "not given on the command line".
    defaults = Config()
    for action in p._actions:
        if action.metavar is None and action.choices is None and action.type is not None:
            action.metavar = "X" if action.type is float else "N"
        value = getattr(defaults, action.dest, None)
        shown_default = value is not None and value is not False and value != []
        if action.help and shown_default and "default" not in action.help:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help += f" (default: {shown})"
    p.set_defaults(**{f.name: None for f in dataclasses.fields(Config)})
    return p


def load_config_file(path: str) -> dict[str, Any]:
    """Option values from a YAML or JSON file, keys normalised to Config field names."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"--config: cannot parse {path}: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    names = {f.name for f in dataclasses.fields(Config)} - {"config"}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"--config: unknown option {key!r} in {path}")
        out[name] = value
    return out


def _as_argv(values: dict[str, Any]) -> list[str]:
    """Option values as command-line words, so a file's values get the flags' exact checks."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if name in _BOOLEAN_OPTIONAL:
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            if value:
                argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


_BOOLEAN_OPTIONAL = frozenset({"compile", "channels_last", "progress", "plot"})


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags (over the config file, over the demo preset, over defaults) as a Config.

    Raises ConfigError for a bad flag or file value (the message names it).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    layers: list[str] = []
    file_values = load_config_file(first.config) if first.config is not None else {}
    if first.demo or file_values.get("demo"):
        layers += _as_argv(DEMO_PRESET)
    if file_values:
        try:
            parser.parse_args(_as_argv(file_values))
        except ConfigError as e:
            raise ConfigError(f"--config {first.config}: {e}") from None
        layers += _as_argv(file_values)
    args = parser.parse_args(layers + argv)
    cfg = Config()
    for key, value in vars(args).items():
        if value is not None and hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def default_cache_dir() -> Path:
    if os.environ.get("FASTKD_CACHE"):
        return Path(os.environ["FASTKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastkd"


# Method defaults from the papers (PAPERS.md): (temperature, alpha).
METHOD_KD_DEFAULTS = {
    "kd": (4.0, 0.9),
    "topk": (4.0, 0.9),
    "nd": (4.0, 0.9),
    "cd": (1.0, None),
    "dih": (5.0, 0.1),
}


def resolve(cfg: Config, *, world_size: int = 1) -> Config:
    """A copy of ``cfg`` with every data- and method-dependent default filled in, validated.

    Raises ConfigError naming the option and what was expected.
    """
    cfg = dataclasses.replace(cfg)
    if cfg.method is None and not cfg.demo:
        raise ConfigError("--method is required (one of " + ", ".join(METHODS) + ") or --demo")
    if cfg.method is not None and cfg.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for m in cfg.demo_methods:
        if m not in METHODS:
            raise ConfigError(f"--demo-methods: unknown method {m!r} (one of {', '.join(METHODS)})")
    embedded = cfg.data is None
    if cfg.demo and not embedded:
        raise ConfigError("--demo runs on the embedded digits; drop --data")
    synthetic = cfg.data == SYNTHETIC
    if not embedded and not synthetic:
        if not Path(cfg.data).is_dir():
            raise ConfigError(f"--data: no such directory: {cfg.data}")
        for split in ("train", "val"):
            if not (Path(cfg.data) / split).is_dir():
                raise ConfigError(
                    f"--data: {cfg.data} must hold {split}/<class>/ folders (ImageNet layout); "
                    f"{Path(cfg.data) / split} is missing"
                )
    if not embedded:
        if cfg.student is None:
            raise ConfigError("--data needs --student (a torchvision model name, e.g. resnet18)")
        if cfg.method not in (None, "scratch"):
            if cfg.teacher is None:
                raise ConfigError(
                    "--data needs --teacher (a torchvision model name, e.g. resnet34)"
                )
            if not cfg.teacher_weights and not synthetic:
                raise ConfigError(
                    f"--method {cfg.method} with --data needs --teacher-weights PATH: teacher "
                    "weights are never downloaded"
                )
        if cfg.train_fraction != 1.0:
            raise ConfigError("--train-fraction applies to the embedded data only")
    else:
        cfg.teacher = cfg.teacher or BUILTIN_TEACHER
        cfg.student = cfg.student or BUILTIN_STUDENT
    for path in cfg.teacher_weights:
        if not Path(path).is_file():
            raise ConfigError(f"--teacher-weights: no such file: {path}")
    if not 0.0 < cfg.train_fraction <= 1.0:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")

    cfg.epochs = cfg.epochs or (30 if embedded else 100)
    cfg.batch_size = cfg.batch_size or (64 if embedded else 256)
    cfg.lr = cfg.lr if cfg.lr is not None else (0.05 if embedded else 0.1)
    cfg.weight_decay = (
        cfg.weight_decay if cfg.weight_decay is not None else (5e-4 if embedded else 1e-4)
    )
    cfg.teacher_epochs = cfg.teacher_epochs or 15
    if cfg.workers is None:
        cfg.workers = 0 if embedded else min(8, max(1, (os.cpu_count() or 1) // world_size))
    if cfg.output is None:
        cfg.output = "runs/demo" if cfg.demo else f"runs/{cfg.method}-seed{cfg.seed}"
    if cfg.cache_dir is None:
        cfg.cache_dir = str(default_cache_dir())

    for name in ("lr", "weight_decay", "momentum", "lr_gamma", "label_smoothing", "feed_beta",
                 "cd_weight", "cd_decay", "cd_ce_weight", "cd_gkd_weight", "warmup_epochs"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be finite and >= 0, got {value}")
    if cfg.lr == 0:
        raise ConfigError("--lr must be > 0")
    if cfg.label_smoothing >= 1:
        raise ConfigError(f"--label-smoothing must be < 1, got {cfg.label_smoothing}")
    if cfg.batch_size % world_size != 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
            f"{world_size} ranks"
        )
    _check_choice(cfg.optimizer, "optimizer", OPTIMIZERS)
    _check_choice(cfg.lr_schedule, "lr-schedule", SCHEDULES)
    _check_choice(cfg.lr_scaling, "lr-scaling", ("none", "linear"))
    _check_choice(cfg.amp, "amp", AMP_MODES)
    _check_choice(cfg.loss_backend, "loss-backend", LOSS_BACKENDS)
    _check_choice(cfg.device, "device", ("auto", "cpu", "cuda"))
    if cfg.lr_schedule == "step" and not cfg.lr_milestones:
        raise ConfigError("--lr-schedule step needs --lr-milestones (epochs)")

    if cfg.method is not None:
        resolve_method(cfg)
    return cfg


def resolve_method(cfg: Config) -> None:
    """Fills the method's defaults in place (PAPERS.md values, epoch boundaries scaled)."""
    t_default, a_default = METHOD_KD_DEFAULTS.get(cfg.method, (None, None))
    if cfg.temperature is None:
        cfg.temperature = t_default
    if cfg.alpha is None:
        cfg.alpha = a_default
    if cfg.temperature is not None and not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise ConfigError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.alpha is not None and not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {cfg.alpha}")
    # The CD paper's boundaries are at epoch 30 of 100: keep the proportion on shorter runs.
    if cfg.cd_decay_every is None:
        cfg.cd_decay_every = max(1, round(0.3 * cfg.epochs))
    if cfg.cd_kd_start is None:
        cfg.cd_kd_start = round(0.3 * cfg.epochs)
    if cfg.dih_head_epochs is None:
        cfg.dih_head_epochs = max(1, round(0.3 * cfg.epochs))
    if cfg.dih_head_lr is None:
        cfg.dih_head_lr = cfg.lr / 10
    if not (math.isfinite(cfg.dih_head_lr) and cfg.dih_head_lr > 0):
        raise ConfigError(f"--dih-head-lr must be > 0, got {cfg.dih_head_lr}")
    if cfg.nd_block_epochs is None:
        cfg.nd_block_epochs = max(1, round(0.5 * cfg.epochs))
    if cfg.method == "nd" and cfg.nd_block_epochs >= cfg.epochs:
        raise ConfigError(
            f"--nd-block-epochs {cfg.nd_block_epochs} must be fewer than --epochs {cfg.epochs}: "
            "the remaining epochs fine-tune the stacked student"
        )
    if cfg.method == "feed" and cfg.teacher_weights:
        cfg.feed_teachers = len(cfg.teacher_weights)
    if cfg.method != "feed" and cfg.method != "scratch" and len(cfg.teacher_weights) > 1:
        raise ConfigError(
            f"--method {cfg.method} distils one teacher; got {len(cfg.teacher_weights)} "
            "--teacher-weights (several are for feed)"
        )
    if cfg.method == "feed" and cfg.feed_teachers < 1:
        raise ConfigError("feed needs at least one teacher")


def _check_choice(value: object, flag: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
