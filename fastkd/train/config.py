"""The trainer's configuration: one definition per option, from which the command-line flags, the
YAML/JSON config file and the ``--resume`` check all derive; validation.

Every option is one field of :class:`Config`, declared with :func:`option`: its name (the flag is
``--`` + the name with ``-`` for ``_``; a config file may use either spelling), its type (the
annotation), default, help, choices, lower bound, and whether it is ``runtime`` -- it does not
change what a run computes, so a resumed run may set it differently; every other option must match
the checkpoint's. :func:`build_parser`, :func:`load_config_file` and ``RUNTIME_FIELDS`` are built
from these fields; nothing else lists options.

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
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import CHOICES as LOSS_BACKENDS

METHODS = ("scratch", "kd", "cd", "dih", "feed", "nd", "topk")
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LR_SCALINGS = ("none", "linear")

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


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any training starts."""


@dataclass(frozen=True)
class Option:
    """What the parser, the config-file loader and the resume check know about one option."""

    group: str
    help: str
    choices: tuple[str, ...] | None = None
    # Smallest allowed value of a number (ints: checked by the parser too).
    at_least: float | None = None
    metavar: str | None = None
    # Value of the flag given without a value (makes the value optional).
    const: Any = None
    # Does not change what the run computes: not checked against the checkpoint on --resume.
    runtime: bool = False
    # May be set in a --config file.
    in_file: bool = True


def option(group: str, default: Any, help: str, **kw: Any) -> Any:
    """A :class:`Config` field and its :class:`Option` (``kw``: Option's other attributes)."""
    meta = {"option": Option(group, help, **kw)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


RUN = "what to run"
DATA = "data and models"
OPTIM = "optimisation"
METHOD = "method hyper-parameters"
SPEED = "speed and scale"
OUTPUT = "output and reliability"


@dataclass
class Config:
    # What to run.
    method: str | None = option(RUN, None, (
        "scratch: student alone, cross-entropy. kd: Hinton KD (T, alpha). cd: channel distillation "
        "with 1x1 connectors at 4 stages + guided KD + early-decay teacher. dih: train one linear "
        "head per teacher stage (teacher frozen), then distil from the cohort of heads + teacher. "
        "feed: parallel FEED, one non-linear transform per teacher on the student's last feature "
        "map, normalised-L1 loss. nd: neighbourhood distillation, student stages trained "
        "independently against the teacher's, then stacked and fine-tuned with KD. topk: partial "
        "teacher, top-k probabilities kept, the rest spread uniformly."), choices=METHODS)
    demo: bool = option(RUN, False, (
        "The main job: on the embedded data, train (or load the cached) teacher, train the student "
        "with every --demo-methods over --demo-seeds, print accuracy mean +- std, time and "
        "images/s per method, write demo.csv/demo.json/demo.png under --output. Preset: "
        + ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items()) + "."), runtime=True)
    demo_seeds: list[int] = option(RUN, [0, 1, 2], "seeds of the demo's runs", runtime=True)
    demo_methods: list[str] = option(RUN, list(METHODS), "methods the demo runs",
                                     choices=METHODS, runtime=True)
    demo_store: bool = option(RUN, True, (
        "the demo also compares training from a teacher store with the live teacher on "
        "crop + flip augmented digits: scratch, kd and topk with --augment, then kd and topk "
        "from a store of 16 crops and the teacher's top 5 classes per image, built once"),
        runtime=True)
    config: str | None = option(RUN, None, (
        "YAML or JSON file of option values (keys as the long flags, with - or _); flags given on "
        "the command line override it"), metavar="FILE", runtime=True, in_file=False)
    # Data and models.
    data: str | None = option(DATA, None, (
        "ImageNet-layout folder with train/<class>/ and val/<class>/ read with torchvision's "
        "ImageFolder (RandomResizedCrop + flip for train, resize + center crop for val, ImageNet "
        "normalisation). 'synthetic': random ImageNet-shaped tensors for throughput "
        "measurements (teacher weights optional there). Default: the embedded digits (1797 8x8 "
        "images, 10 classes, fixed 70/30 train/val split)"), metavar="DIR")
    synthetic_images: int = option(DATA, 12800, (
        "--data synthetic: training images per epoch (validation: a tenth as many)"), at_least=1)
    synthetic_classes: int = option(DATA, 1000, "--data synthetic: classes", at_least=1)
    train_fraction: float = option(DATA, 1.0, (
        "embedded data: fraction of the training split the student trains on (a fixed stratified "
        "subset); the teacher always trains on the whole split"))
    image_size: int = option(DATA, 224, (
        "--data: training crop size; validation resizes to size*256/224 and center-crops size"),
        at_least=1)
    augment: bool = option(DATA, False, (
        "embedded digits: train on a random resized crop (at least half the image, back to 8x8) "
        "+ horizontal flip of each image, drawn from (seed, epoch, image). --data folders are "
        "always augmented (RandomResizedCrop + flip), --data synthetic never"))
    teacher_store: str | None = option(DATA, None, (
        "train from a teacher-output store built by `python -m fastkd.train store build` (kd, "
        "topk, dih): no teacher in the training loop; each epoch every image replays one of its "
        "stored crops and the loss reads the teacher's stored top-k log-probabilities (uniform "
        "tail). Refused when it does not match the run's data, teacher or --topk"),
        metavar="DIR")
    crops: int = option(DATA, 8, (
        "store build: augmentations (crop box + flip) drawn and stored per training image"),
        at_least=1)
    teacher: str | None = option(DATA, None, (
        f"teacher model: '{BUILTIN_TEACHER}' (embedded data) or a torchvision classification "
        "model name such as resnet34 (built with weights=None). Default: the built-in teacher on "
        "the embedded data; required with --data"))
    student: str | None = option(DATA, None, (
        f"student model: '{BUILTIN_STUDENT}' (embedded data) or a torchvision model name such as "
        "resnet18 (random init). Default: the built-in student; required with --data"))
    teacher_weights: list[str] = option(DATA, [], (
        "teacher weights: a state_dict file (torchvision key names), a fastkd checkpoint or a "
        "fastkd student.pt; several paths for feed (one per teacher). Never downloaded. Required "
        "with --data for every method but scratch; on the embedded data, without it the teacher "
        "is trained once and cached"), metavar="PATH")
    teacher_epochs: int | None = option(DATA, None, (
        "embedded data: epochs to train the built-in teacher when it is not cached (default 15, "
        "about 99%% validation accuracy)"), at_least=1)
    cache_dir: str | None = option(DATA, None, (
        "where trained embedded teachers are cached, keyed by their recipe and seed (default "
        "$FASTKD_CACHE, else $XDG_CACHE_HOME/fastkd, else ~/.cache/fastkd)"), metavar="DIR",
        runtime=True)
    # Optimisation.
    epochs: int | None = option(OPTIM, None, (
        "epochs of the student's training (for nd: block-wise phase + fine-tuning; dih's "
        "head training comes before them); default 30 on the embedded data, 100 with --data "
        "(the CD paper's ImageNet recipe)"), at_least=1)
    batch_size: int | None = option(OPTIM, None, (
        "global batch size, split evenly over the ranks (default 64 embedded, 256 with --data)"),
        at_least=1)
    lr: float | None = option(OPTIM, None, (
        "peak learning rate (default 0.05 embedded, 0.1 with --data); with --lr-scaling linear "
        "it is the rate at --lr-base-batch"), at_least=0.0)
    optimizer: str = option(OPTIM, "sgd", (
        "sgd (momentum, nesterov off), adamw, or the large-batch optimizers lars / lamb from timm"),
        choices=OPTIMIZERS)
    momentum: float = option(OPTIM, 0.9, "SGD/LARS momentum", at_least=0.0)
    weight_decay: float | None = option(OPTIM, None, (
        "weight decay on weights of rank >= 2 (biases and norm parameters are not decayed); "
        "default 5e-4 embedded, 1e-4 with --data"), at_least=0.0)
    lr_schedule: str = option(OPTIM, "cosine", (
        "after warm-up: cosine to 0, step (x --lr-gamma at --lr-milestones), or constant"),
        choices=SCHEDULES)
    lr_milestones: list[int] = option(OPTIM, [], (
        "step schedule: epochs at which the rate is multiplied by --lr-gamma (CD paper: 30 60 90)"))
    lr_gamma: float = option(OPTIM, 0.1, "step schedule factor", at_least=0.0)
    lr_scaling: str = option(OPTIM, "none", (
        "linear: lr = --lr * global batch / --lr-base-batch (the large-batch recipe, with "
        "--warmup-epochs and --optimizer lars or lamb)"), choices=LR_SCALINGS)
    lr_base_batch: int = option(OPTIM, 256, "reference batch of --lr-scaling", at_least=1)
    warmup_epochs: float = option(OPTIM, 0.0, "linear warm-up from 0, in epochs", at_least=0.0)
    label_smoothing: float = option(OPTIM, 0.0, "label smoothing of every CE term", at_least=0.0)
    seed: int = option(OPTIM, 0, "seed of initialisation, data order, augmentation")
    # Method hyper-parameters (None: the method's default).
    temperature: float | None = option(METHOD, None, (
        "KD temperature T (default: kd/topk/nd 4, cd 1 (GKD), dih 5)"))
    alpha: float | None = option(METHOD, None, (
        "weight of the KD term, 1-alpha on CE (default: kd/topk/nd 0.9, dih 0.1)"))
    cd_weight: float = option(METHOD, 6.0, "cd: initial channel-attention loss weight",
                              at_least=0.0)
    cd_decay: float = option(METHOD, 0.9, "cd: early-decay-teacher factor", at_least=0.0)
    cd_decay_every: int | None = option(METHOD, None, (
        "cd: epochs between decays of the CD weight (default 30%% of --epochs: 30 of 100)"),
        at_least=1)
    cd_kd_start: int | None = option(METHOD, None, (
        "cd: CE and guided KD are off for epochs <= this (a CD-only warm-up; default 30%% of "
        "--epochs: 30 of 100)"), at_least=0)
    cd_ce_weight: float = option(METHOD, 1.0, "cd: CE weight after the warm-up", at_least=0.0)
    cd_gkd_weight: float = option(METHOD, 1.0, "cd: guided-KD weight after the warm-up",
                                  at_least=0.0)
    dih_head_epochs: int | None = option(METHOD, None, (
        "dih: epochs training the intermediate heads on the frozen teacher (default 30%% of "
        "--epochs)"), at_least=1)
    dih_head_lr: float | None = option(METHOD, None, (
        "dih: peak learning rate of the head training (default --lr / 10: a linear layer on an "
        "unnormalised early stage map, e.g. 2048 inputs on the digits, diverges at --lr)"))
    feed_teachers: int = option(METHOD, 2, (
        "feed, embedded data: number of teachers (differently seeded built-in teachers); with "
        "--data the count of --teacher-weights"), at_least=1)
    feed_beta: float = option(METHOD, 500.0, "feed: weight of the normalised-L1 loss",
                              at_least=0.0)
    nd_block_epochs: int | None = option(METHOD, None, (
        "nd: of the --epochs, those training the student stages independently (default 50%%); "
        "the rest fine-tune the stacked student end to end with KD"), at_least=1)
    topk: int = option(METHOD, 3, (
        "topk: teacher probabilities kept per row; store build: the teacher's classes stored per "
        "crop (10 is FKD's choice for ImageNet)"), at_least=1)
    # Speed and scale.
    device: str = option(SPEED, "auto", (
        "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU"), choices=DEVICES,
        runtime=True)
    amp: str = option(SPEED, "auto", (
        "mixed precision: bf16 autocast (on the CPU too, where it is correct but rarely faster), "
        "fp16 autocast with a gradient scaler (GPU only), off; auto: bf16 on CUDA, off on the "
        "CPU. '--amp' alone means bf16"), choices=AMP_MODES, const="bf16")
    compile: bool = option(SPEED, False, "torch.compile the teacher and the trained modules",
                           runtime=True)
    channels_last: bool | None = option(SPEED, None, (
        "channels_last memory format for models and images (default: on for CUDA, off on CPU)"))
    workers: int | None = option(SPEED, None, (
        "DataLoader worker processes per rank (default 0 for the in-memory digits, "
        "min(8, cpus per rank) with --data)"), at_least=0, runtime=True)
    threads: int | None = option(SPEED, None, (
        "torch intra-op threads per process (default: 1 on the embedded data, whose tiny "
        "convolutions gain nothing from threads; with --data torch's choice, or cpus / ranks "
        "under torchrun on the CPU)"), at_least=1, runtime=True)
    loss_backend: str = option(SPEED, "auto", (
        "backend of fastkd's losses; 'torch' is fastkd's plain-PyTorch reference (eager losses, "
        "for comparisons)"), choices=LOSS_BACKENDS, runtime=True)
    max_steps_per_epoch: int | None = option(SPEED, None, (
        "cap on steps per epoch (quick runs, benchmarks)"), at_least=1)
    profile_steps: int = option(SPEED, 0, (
        "time the first N steps section by section (data, teacher forward, student forward, "
        "distillation losses, backward + step), synchronising the device; prints the split and "
        "writes profile.json, then training continues"), at_least=0, runtime=True)
    # Output and reliability.
    output: str | None = option(OUTPUT, None, (
        "directory for checkpoint.pt, student.pt, metrics.csv/json, plot.png, tb/ (default "
        "runs/<method>-seed<seed>)"), metavar="DIR", runtime=True)
    overwrite: bool = option(OUTPUT, False, (
        "start afresh even if --output holds a checkpoint (it is replaced)"), runtime=True)
    resume: str | None = option(OUTPUT, None, (
        "continue from a checkpoint (default <output>/checkpoint.pt) exactly where it stopped; "
        "the configuration must match the checkpoint's"), metavar="PATH", const="auto",
        runtime=True)
    checkpoint_every: int = option(OUTPUT, 0, (
        "also checkpoint every N optimizer steps (0: only at epoch ends)"), at_least=0,
        runtime=True)
    stop_after_steps: int | None = option(OUTPUT, None, (
        "checkpoint and stop after N optimizer steps of this process (time-boxed or preemptible "
        "jobs; continue with --resume)"), at_least=1, runtime=True)
    log_interval: int = option(OUTPUT, 20, (
        "steps between progress-bar updates (and, on GPU, non-finite-loss checks)"), at_least=1,
        runtime=True)
    eval_every: int = option(OUTPUT, 1, (
        "validate every N epochs (and after each phase's last epoch); metrics rows of the other "
        "epochs have empty validation columns"), at_least=1)
    plot: bool = option(OUTPUT, True, (
        "write plot.png (accuracy and loss curves) at the end of the run"), runtime=True)
    progress: bool | None = option(OUTPUT, None, (
        "tqdm progress bars on rank 0 (default: when stderr is a terminal)"), runtime=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _value_type(name: str) -> tuple[type, bool]:
    """(element type, is a list) of option ``name``, from its annotation."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


_HINTS = typing.get_type_hints(Config)
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(Config)}
# Options that do not change what a run computes: a resumed run may set them differently.
RUNTIME_FIELDS = frozenset(name for name, o in OPTIONS.items() if o.runtime)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _integer(at_least: float | None) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(_bound_message(value, at_least))
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def _bound_message(value: object, at_least: float) -> str:
    return (f"must be a positive integer, got {value}" if at_least == 1
            else f"must be >= {at_least:g}, got {value}")


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting, so file values and flags fail the same way."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per :class:`Config` field."""
    p = _Parser(
        prog="python -m fastkd.train",
        description=(
            "Distil a student from a teacher with fastkd's fused losses. With only --method it "
            "runs on the embedded data (scikit-learn's handwritten digits, no download): it trains "
            "the built-in teacher once, caches it, and distils the built-in student. With --data "
            "DIR it reads an ImageNet-layout folder and uses torchvision models. --demo runs the "
            "main job: scratch and every distillation method over 3 seeds on the embedded data, "
            "a table and a plot. Hyper-parameters default to the papers' values (fastkd's "
            "docs/methods.md); on the embedded data, epoch counts are scaled down and epoch "
            "boundaries scaled with them. `python -m fastkd.train store build --output DIR "
            "--crops M --topk K [these options]` runs the teacher once over M stored crops per "
            "training image for --teacher-store DIR (docs/teacher_store.md); `store info DIR` "
            "verifies a store."
        ),
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = Config()
    for name, o in OPTIONS.items():
        group = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        kind, is_list = _value_type(name)
        kw: dict[str, Any] = {"dest": name, "help": o.help}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if kind is int:
                kw["type"] = _integer(o.at_least)
            elif kind is float:
                kw["type"] = float
            if o.choices is not None:
                kw["choices"] = o.choices
            if is_list:
                kw["nargs"] = "+"
            if o.const is not None:
                kw.update(nargs="?", const=o.const)
            if o.metavar is not None:
                kw["metavar"] = o.metavar
            elif o.choices is None and kind in (int, float):
                kw["metavar"] = "X" if kind is float else "N"
        value = getattr(defaults, name)
        if value is not None and value is not False and value != [] and "default" not in o.help:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            kw["help"] += f" (default: {shown})"
        group.add_argument(flag(name), **kw)
    # None on the parser means "not given on the command line"; every default comes from Config.
    p.set_defaults(**dict.fromkeys(OPTIONS))
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
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS or not OPTIONS[name].in_file:
            raise ConfigError(f"--config: unknown option {key!r} in {path}")
        if _value_type(name)[0] is bool and value is not None and not isinstance(value, bool):
            raise ConfigError(f"--config: {key} in {path} must be true or false, got {value!r}")
        out[name] = value
    return out


def _as_argv(values: dict[str, Any]) -> list[str]:
    """Option values as command-line words, so a file's values get the flags' exact checks."""
    argv: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, (list, tuple)):
            if value:
                argv += [flag(name), *map(str, value)]
        else:
            argv += [flag(name), str(value)]
    return argv


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
    given = {k: v for k, v in vars(args).items() if v is not None}
    return Config(**given)


def default_cache_dir() -> Path:
    if os.environ.get("FASTKD_CACHE"):
        return Path(os.environ["FASTKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastkd"


# Method defaults from the papers (docs/methods.md): (temperature, alpha).
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
    _check_choices(cfg)
    _resolve_data(cfg)
    embedded = cfg.data is None
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

    _check_bounds(cfg)
    if cfg.lr == 0:
        raise ConfigError("--lr must be > 0")
    if cfg.label_smoothing >= 1:
        raise ConfigError(f"--label-smoothing must be < 1, got {cfg.label_smoothing}")
    if cfg.batch_size % world_size != 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
            f"{world_size} ranks"
        )
    if cfg.lr_schedule == "step" and not cfg.lr_milestones:
        raise ConfigError("--lr-schedule step needs --lr-milestones (epochs)")

    if cfg.method is not None:
        resolve_method(cfg)
    return cfg


def _resolve_data(cfg: Config) -> None:
    """Checks the data and model options against each other; the built-in models on the digits."""
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
            if not cfg.teacher_weights and not synthetic and cfg.teacher_store is None:
                raise ConfigError(
                    f"--method {cfg.method} with --data needs --teacher-weights PATH (or a "
                    "--teacher-store): teacher weights are never downloaded"
                )
        if cfg.train_fraction != 1.0:
            raise ConfigError("--train-fraction applies to the embedded data only")
        if cfg.augment:
            raise ConfigError("--augment applies to the embedded digits; --data folders are "
                              "always augmented and --data synthetic never is")
    else:
        cfg.teacher = cfg.teacher or BUILTIN_TEACHER
        cfg.student = cfg.student or BUILTIN_STUDENT
    if cfg.teacher_store is not None and not Path(cfg.teacher_store).is_dir():
        raise ConfigError(f"--teacher-store: no such directory: {cfg.teacher_store}")
    for path in cfg.teacher_weights:
        if not Path(path).is_file():
            raise ConfigError(f"--teacher-weights: no such file: {path}")
    if not 0.0 < cfg.train_fraction <= 1.0:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")


def resolve_method(cfg: Config) -> None:
    """Fills the method's defaults in place (docs/methods.md values, epoch boundaries scaled)."""
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


def _check_choices(cfg: Config) -> None:
    for name, o in OPTIONS.items():
        value = getattr(cfg, name)
        if o.choices is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v not in o.choices:
                raise ConfigError(
                    f"{flag(name)} must be one of {', '.join(o.choices)}, got {v!r}")


def _check_bounds(cfg: Config) -> None:
    """Every number against its option's lower bound (flags were checked by the parser already;
    this catches a Config built in Python)."""
    for name, o in OPTIONS.items():
        value = getattr(cfg, name)
        if o.at_least is None or value is None:
            continue
        if _value_type(name)[0] is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{flag(name)} must be an integer, got {value!r}")
            if value < o.at_least:
                raise ConfigError(f"{flag(name)} {_bound_message(value, o.at_least)}")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{flag(name)} must be a number, got {value!r}")
        if not math.isfinite(value) or value < o.at_least:
            raise ConfigError(f"{flag(name)} must be finite and >= {o.at_least:g}, got {value}")
