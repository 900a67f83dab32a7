"""The distillation methods as training phases: what is trained, what the teacher computes, the
loss.

A method is one or two :class:`Phase` s. Each phase names the module the optimizer trains (its
``forward(x, teacher_out)`` is the student side of a step and is what DDP wraps), a teacher-side
function run under ``torch.inference_mode``, a loss, and what validation scores. Every
distillation loss goes through fastkd's fused ops (``fastkd.kd_loss``,
``fastkd.channel_attention_loss``, ``fastkd.feature_regression_loss``); plain cross-entropy on hard
labels (scratch, FEED's CE term, DIH's head training) is ``torch.nn.functional.cross_entropy``.

Teacher outputs are inference tensors. fastkd's ops save only the student's gradient for
backward, so they take them as they are; where a teacher activation is the *input* of a trained
module (DIH's heads, ND's student blocks) it is cloned first, because autograd cannot save an
inference tensor.

Methods (sections of docs/methods.md; defaults in ``fastkd.train.config``):

* ``scratch``: ``CE(s, y)``.
* ``kd`` (section 1): ``alpha * T^2 KL(p || q) + (1 - alpha) CE``.
* ``topk`` (section 6): ``kd`` against the partial teacher of ``fastkd.train.topk`` (a sparse
  teacher: its k classes and the uniform tail).
* ``cd`` (section 2): ``w_cd(e) * CD(connector(F_s), F_t) + w_ce(e) * CE + w_gkd(e) * GKD`` over
  the four stages, with the early-decay schedule ``w_cd(e) = cd_weight * cd_decay^floor(e / every)``
  and CE/GKD off for ``e <= cd_kd_start`` (epochs counted from 1).
* ``dih`` (section 3): phase 1 trains one linear head per teacher stage on the frozen teacher
  (sum of CEs); phase 2 distils from the cohort of the k heads and the teacher,
  ``sum_j [alpha T^2 KL(p_j || q) + (1 - alpha) CE]``. The heads see the flattened maps, as in the
  paper's code: on ImageNet, ResNet-34's first head alone is 64*56*56 x 1000 = 200M weights.
* ``feed`` (section 4): ``CE + beta * sum_k mean|n(T_k(F_s)) - n(F_t^k)|`` with one
  3 x (conv3x3 + LeakyReLU(0.1)) transform per teacher on the student's last stage.
* ``nd`` (section 5): phase 1 trains each student stage (and the head) to reproduce the teacher's,
  fed the teacher's activation, with MSE -- all blocks at once, no gradient between them; phase 2
  fine-tunes the stacked student end to end with ``kd``. The two phases share ``--epochs``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastkd

from .config import Config, ConfigError
from .models import StagedNet, stage_shapes
from .topk import partial_teacher

Parts = dict[str, torch.Tensor]


@dataclass
class TeacherOut:
    """Per teacher (or cohort member): logits, and the stage maps when the method needs them."""

    logits: list[torch.Tensor | fastkd.SparseTeacher]
    feats: list[list[torch.Tensor]] = field(default_factory=list)


@dataclass
class Phase:
    name: str
    epochs: int
    module: nn.Module
    loss: Callable[[dict, TeacherOut | None, torch.Tensor, int], tuple[torch.Tensor, Parts]]
    evaluate: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    teacher: Callable[[torch.Tensor], TeacherOut] | None = None
    # Modules put in train mode with gradients on for this phase; every other is frozen.
    trainable: list[nn.Module] = field(default_factory=list)
    # Peak learning rate of this phase (None: --lr).
    lr: float | None = None


@dataclass
class Plan:
    phases: list[Phase]
    # Everything a checkpoint holds (the student and the method's own modules).
    modules: dict[str, nn.Module]


@dataclass
class Context:
    cfg: Config
    student: StagedNet
    teachers: list[StagedNet]
    num_classes: int
    input_shape: tuple[int, int, int]


# Methods that need the four stage outputs of the models.
FEATURE_METHODS = {"cd": "both", "dih": "teacher", "feed": "both", "nd": "both"}


def needs_features(method: str, role: str) -> bool:
    need = FEATURE_METHODS.get(method)
    return need == "both" or need == role


def build(ctx: Context) -> Plan:
    builders = {
        "scratch": _scratch, "kd": _kd, "topk": _topk, "cd": _cd, "dih": _dih, "feed": _feed,
        "nd": _nd,
    }
    return builders[ctx.cfg.method](ctx)


class StudentForward(nn.Module):
    """The student alone: ``{"logits": s}``."""

    def __init__(self, student: StagedNet) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, teacher_out: TeacherOut | None = None) -> dict:
        return {"logits": self.student(x)[1]}


def _student_eval(student: StagedNet) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    return lambda x: {"student": student(x)[1]}


def _teacher_logits(teacher: StagedNet) -> Callable[[torch.Tensor], TeacherOut]:
    return lambda x: TeacherOut([teacher(x)[1]])


def _teacher_all(teachers: list[StagedNet]) -> Callable[[torch.Tensor], TeacherOut]:
    def run(x: torch.Tensor) -> TeacherOut:
        outs = [t(x) for t in teachers]
        return TeacherOut([o[1] for o in outs], [o[0] for o in outs])

    return run


def _ce(cfg: Config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda s, y: F.cross_entropy(s, y, label_smoothing=cfg.label_smoothing)


def _kd_loss(cfg: Config, s, teacher, y, *, temperature, alpha, **kw) -> torch.Tensor:
    return fastkd.kd_loss(
        s, teacher, y, temperature=temperature, alpha=alpha,
        label_smoothing=cfg.label_smoothing, backend=cfg.loss_backend, **kw,
    )


def _scratch(ctx: Context) -> Plan:
    ce = _ce(ctx.cfg)

    def loss(out, tout, y, epoch):
        value = ce(out["logits"], y)
        return value, {}

    phase = Phase("student", ctx.cfg.epochs, StudentForward(ctx.student), loss,
                  _student_eval(ctx.student), None, [ctx.student])
    return Plan([phase], {"student": ctx.student})


def _kd_phase(ctx: Context, name: str, teacher_fn, epochs: int | None = None) -> Phase:
    cfg = ctx.cfg

    def loss(out, tout, y, epoch):
        return _kd_loss(cfg, out["logits"], tout.logits[0], y, temperature=cfg.temperature,
                        alpha=cfg.alpha), {}

    return Phase(name, cfg.epochs if epochs is None else epochs, StudentForward(ctx.student), loss,
                 _student_eval(ctx.student), teacher_fn, [ctx.student])


def _kd(ctx: Context) -> Plan:
    return Plan([_kd_phase(ctx, "student", _teacher_logits(ctx.teachers[0]))],
                {"student": ctx.student})


def check(cfg: Config, num_classes: int) -> None:
    """Method settings that depend on the data; raised before any model is built."""
    if cfg.method == "topk" and cfg.topk >= num_classes:
        raise ConfigError(
            f"--topk {cfg.topk} keeps every one of the {num_classes} classes (plain kd); "
            f"use k < {num_classes}"
        )


def _topk(ctx: Context) -> Plan:
    cfg, teacher = ctx.cfg, ctx.teachers[0]

    def teacher_fn(x):
        return TeacherOut([partial_teacher(teacher(x)[1], cfg.topk, cfg.temperature)])

    return Plan([_kd_phase(ctx, "student", teacher_fn)], {"student": ctx.student})


# --- Channel distillation + guided KD + early-decay teacher -------------------------------------


def _connector(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN + ReLU, as in the CD paper's code -- also when cin == cout."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CDForward(nn.Module):
    def __init__(self, student: StagedNet, connectors: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.connectors = connectors

    def forward(self, x: torch.Tensor, teacher_out: TeacherOut | None = None) -> dict:
        feats, logits = self.student(x)
        connected = [c(f) for c, f in zip(self.connectors, feats, strict=True)]
        return {"logits": logits, "feats": connected}


def cd_weights(cfg: Config, epoch: int) -> tuple[float, float, float]:
    """(CD, CE, GKD) weights at 1-based ``epoch`` of the student phase (early-decay teacher)."""
    w_cd = cfg.cd_weight * cfg.cd_decay ** (epoch // cfg.cd_decay_every)
    on = epoch > cfg.cd_kd_start
    return w_cd, (cfg.cd_ce_weight if on else 0.0), (cfg.cd_gkd_weight if on else 0.0)


def _cd(ctx: Context) -> Plan:
    cfg, teacher = ctx.cfg, ctx.teachers[0]
    s_shapes = stage_shapes(ctx.student, ctx.input_shape)
    t_shapes = stage_shapes(teacher, ctx.input_shape)
    connectors = nn.ModuleList(
        _connector(s[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True)
    )
    module = CDForward(ctx.student, connectors)

    def loss(out, tout, y, epoch):
        w_cd, w_ce, w_gkd = cd_weights(cfg, epoch)
        cd = fastkd.channel_attention_loss(out["feats"], tout.feats[0], backend=cfg.loss_backend)
        # CE + GKD as one fused call: (w_ce + w_gkd) * [a GKD + (1 - a) CE] with a = w_gkd / sum.
        # During the CD-only warm-up both weights are 0; the term stays in the graph with weight
        # 0 so every parameter gets a gradient (DDP needs each one in every step).
        total_w = w_ce + w_gkd
        a = w_gkd / total_w if total_w > 0 else 0.5
        logit = _kd_loss(cfg, out["logits"], tout.logits[0], y, temperature=cfg.temperature,
                         alpha=a, guided=True)
        return w_cd * cd + total_w * logit, {"cd": cd.detach(), "ce_gkd": logit.detach()}

    phase = Phase("student", cfg.epochs, module, loss, _student_eval(ctx.student),
                  _teacher_all([teacher]), [ctx.student, connectors])
    return Plan([phase], {"student": ctx.student, "connectors": connectors})


# --- DIH: intermediate heads on the frozen teacher, then the cohort ------------------------------


class HeadsForward(nn.Module):
    """Phase 1 of DIH: one linear head per teacher stage on the flattened stage map."""

    def __init__(self, heads: nn.ModuleList) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor, teacher_out: TeacherOut) -> dict:
        # Cloned: a trained Linear saves its input, and autograd cannot save inference tensors.
        feats = teacher_out.feats[0]
        return {"heads": [h(f.flatten(1).clone()) for h, f in zip(self.heads, feats, strict=True)]}


def _dih(ctx: Context) -> Plan:
    cfg, teacher = ctx.cfg, ctx.teachers[0]
    shapes = stage_shapes(teacher, ctx.input_shape)
    heads = nn.ModuleList(
        nn.Linear(c * h * w, ctx.num_classes) for c, h, w in shapes
    )
    ce = _ce(cfg)

    def heads_loss(out, tout, y, epoch):
        losses = [ce(logits, y) for logits in out["heads"]]
        return torch.stack(losses).sum(), {f"ce_head{i + 1}": v.detach()
                                           for i, v in enumerate(losses)}

    def heads_eval(x):
        feats, _ = teacher(x)
        pairs = enumerate(zip(heads, feats, strict=True))
        return {f"head{i + 1}": h(f.flatten(1)) for i, (h, f) in pairs}

    def cohort(x):
        feats, logits = teacher(x)
        return TeacherOut([*(h(f.flatten(1)) for h, f in zip(heads, feats, strict=True)), logits])

    phases = [
        Phase("heads", cfg.dih_head_epochs, HeadsForward(heads), heads_loss, heads_eval,
              _teacher_all([teacher]), [heads], lr=cfg.dih_head_lr),
        _cohort_phase(ctx, cohort),
    ]
    return Plan(phases, {"student": ctx.student, "heads": heads})


def _cohort_phase(ctx: Context, cohort) -> Phase:
    """DIH's student phase: distils from every member of the cohort ``cohort(x)`` returns."""
    cfg = ctx.cfg

    def student_loss(out, tout, y, epoch):
        # sum_j [alpha KD_j + (1 - alpha) CE] = scale * [a sum_j KD_j + (1 - a) CE]
        # with scale = alpha + k1 (1 - alpha) and a = alpha / scale, k1 members.
        k1 = len(tout.logits)
        scale = cfg.alpha + k1 * (1.0 - cfg.alpha)
        a = cfg.alpha / scale
        return scale * _kd_loss(cfg, out["logits"], tout.logits, y, temperature=cfg.temperature,
                                alpha=a), {}

    return Phase("student", cfg.epochs, StudentForward(ctx.student), student_loss,
                 _student_eval(ctx.student), cohort, [ctx.student])


def build_from_store(ctx: Context, teacher_fn: Callable) -> Plan:
    """kd, topk or dih with the teacher side read from a teacher store (``teacher_fn`` maps the
    batch's stored rows to the :class:`TeacherOut` of the live teacher's place): the student phase
    alone -- DIH's heads were trained, and ran, when the store was built."""
    if ctx.cfg.method == "dih":
        phase = _cohort_phase(ctx, teacher_fn)
    else:
        phase = _kd_phase(ctx, "student", teacher_fn)
    return Plan([phase], {"student": ctx.student})


# --- FEED: parallel feature ensemble ------------------------------------------------------------


def _transform(cin: int, cout: int) -> nn.Sequential:
    """Factor Transfer's translator: 3 x (3x3 conv with bias + LeakyReLU(0.1)), no BN."""
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FEEDForward(nn.Module):
    def __init__(self, student: StagedNet, transforms: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.transforms = transforms

    def forward(self, x: torch.Tensor, teacher_out: TeacherOut | None = None) -> dict:
        feats, logits = self.student(x)
        return {"logits": logits, "factors": [t(feats[-1]) for t in self.transforms]}


def _feed(ctx: Context) -> Plan:
    cfg = ctx.cfg
    s_last = stage_shapes(ctx.student, ctx.input_shape)[-1]
    transforms = nn.ModuleList()
    for i, teacher in enumerate(ctx.teachers):
        t_last = stage_shapes(teacher, ctx.input_shape)[-1]
        if t_last[1:] != s_last[1:]:
            raise ConfigError(
                f"feed: teacher {i + 1}'s last stage map is {t_last[1]}x{t_last[2]} but the "
                f"student's is {s_last[1]}x{s_last[2]}; FEED needs equal spatial sizes"
            )
        transforms.append(_transform(s_last[0], t_last[0]))
    ce = _ce(cfg)

    def teacher_fn(x):
        return TeacherOut([], [[t(x)[0][-1]] for t in ctx.teachers])

    def loss(out, tout, y, epoch):
        ce_value = ce(out["logits"], y)
        feed = fastkd.feature_regression_loss(
            out["factors"], [f[0] for f in tout.feats], p=1, normalize=True,
            backend=cfg.loss_backend,
        )
        return ce_value + cfg.feed_beta * feed, {"ce": ce_value.detach(), "feed": feed.detach()}

    phase = Phase("student", cfg.epochs, FEEDForward(ctx.student, transforms), loss,
                  _student_eval(ctx.student), teacher_fn, [ctx.student, transforms])
    return Plan([phase], {"student": ctx.student, "transforms": transforms})


# --- Neighbourhood distillation ------------------------------------------------------------------


class NDBlocksForward(nn.Module):
    """Phase 1 of ND: student block i applied to the teacher's activation entering block i."""

    def __init__(self, student: StagedNet) -> None:
        super().__init__()
        self.student = student
        self._blocks = student.blocks()

    def forward(self, x: torch.Tensor, teacher_out: TeacherOut) -> dict:
        # Cloned: the student blocks save their inputs, and autograd cannot save inference tensors.
        inputs = [x, *(f.clone() for f in teacher_out.feats[0])]
        return {"blocks": [b(i) for b, i in zip(self._blocks, inputs, strict=True)]}


def _nd(ctx: Context) -> Plan:
    cfg, teacher = ctx.cfg, ctx.teachers[0]
    if ctx.student.blocks() is None or teacher.blocks() is None:
        raise ConfigError(
            "nd trains the student stage by stage and needs models split into explicit stages: "
            "the built-in digits networks or torchvision ResNets"
        )
    s_shapes = stage_shapes(ctx.student, ctx.input_shape)
    t_shapes = stage_shapes(teacher, ctx.input_shape)
    if s_shapes != t_shapes:
        raise ConfigError(
            "nd feeds each student stage the teacher's activation and regresses its output on the "
            f"teacher's, so the stage shapes must match: student {s_shapes}, teacher {t_shapes} "
            "(e.g. resnet34 -> resnet18)"
        )

    def blocks_loss(out, tout, y, epoch):
        blocks = out["blocks"]
        stages = fastkd.feature_regression_loss(blocks[:4], tout.feats[0], p=2,
                                                backend=cfg.loss_backend)
        head = fastkd.feature_regression_loss(blocks[4], tout.logits[0], p=2,
                                              backend=cfg.loss_backend)
        return stages + head, {"mse_stages": stages.detach(), "mse_head": head.detach()}

    phases = [
        Phase("blocks", cfg.nd_block_epochs, NDBlocksForward(ctx.student), blocks_loss,
              _student_eval(ctx.student), _teacher_all([teacher]), [ctx.student]),
        _kd_phase(ctx, "student", _teacher_logits(teacher), cfg.epochs - cfg.nd_block_epochs),
    ]
    return Plan(phases, {"student": ctx.student})


def describe(cfg: Config) -> dict[str, Any]:
    """The hyper-parameters a method uses, for logs and the run's summary."""
    m = cfg.method
    d: dict[str, Any] = {"method": m, "epochs": cfg.epochs}
    if m in ("kd", "topk", "nd", "dih", "cd"):
        d["temperature"] = cfg.temperature
    if m in ("kd", "topk", "nd", "dih"):
        d["alpha"] = cfg.alpha
    if m == "topk":
        d["k"] = cfg.topk
    if m == "cd":
        d.update(cd_weight=cfg.cd_weight, cd_decay=cfg.cd_decay, cd_decay_every=cfg.cd_decay_every,
                 cd_kd_start=cfg.cd_kd_start, ce_weight=cfg.cd_ce_weight,
                 gkd_weight=cfg.cd_gkd_weight)
    if m == "dih":
        d["head_epochs"] = cfg.dih_head_epochs
    if m == "feed":
        d.update(teachers=cfg.feed_teachers, beta=cfg.feed_beta)
    if m == "nd":
        d["block_epochs"] = cfg.nd_block_epochs
    return d
