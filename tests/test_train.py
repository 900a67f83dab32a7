"""The trainer end to end on the embedded digits: every method, outputs, profiling, config files.

Runs are tiny (a couple of steps per epoch); the built-in teachers are trained for one epoch and
cached once per test session.
"""

import json
import math

import pytest
import torch

from fastkd.train import METHODS, Config, parse_args, train
from fastkd.train.__main__ import main
from fastkd.train.models import build_model


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "fastkd-cache")


def tiny(method, output, cache_dir, **kw):
    values = dict(
        method=method, epochs=1, train_fraction=0.1, batch_size=16, max_steps_per_epoch=2,
        teacher_epochs=1, cache_dir=cache_dir, output=str(output), dih_head_epochs=1,
        nd_block_epochs=1,
    )
    values.update(kw)
    return Config(**values)


PHASES = {"dih": ["heads", "student"], "nd": ["blocks", "student"]}


@pytest.mark.parametrize("method", METHODS)
def test_method_smoke(method, tmp_path, cache_dir):
    out = tmp_path / method
    # nd splits --epochs between its block-wise phase and the fine-tuning.
    result = train(tiny(method, out, cache_dir, epochs=2 if method == "nd" else 1), quiet=True)
    assert 0.0 <= result.val_top1 <= 100.0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["phase"] for r in rows] == PHASES.get(method, ["student"])
    for row in rows:
        assert math.isfinite(row["train_loss"])
    assert rows[-1]["val_top1"] == result.val_top1
    if method == "dih":  # the heads train at --dih-head-lr, by default --lr / 10
        assert rows[0]["lr"] <= 0.005 < rows[1]["lr"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["finished"] and state["position"]["epoch"] == len(rows)
    assert state["position"]["global_step"] == 2 * len(rows)
    student = build_model("digits-student", 10, with_features=False, input_shape=(1, 8, 8))
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))


def test_outputs_profile_and_summary(tmp_path, cache_dir, capsys):
    out = tmp_path / "kd"
    code = main([
        "--method", "kd", "--epochs", "2", "--train-fraction", "0.1", "--batch-size", "16",
        "--max-steps-per-epoch", "3", "--teacher-epochs", "1", "--cache-dir", cache_dir,
        "--output", str(out), "--profile-steps", "2", "--no-progress",
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "profile of 2 steps" in text and "teacher_forward" in text
    assert "val top1 %" in text and "images/s" in text  # the final summary table
    profile = json.loads((out / "profile.json").read_text())
    assert profile["steps"] == 2 and set(profile["ms_per_step"]) == {
        "data", "teacher_forward", "student_forward", "distillation_loss", "backward_step"}
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "phase", "lr", "train_loss", "train_top1", "val_loss", "val_top1",
                   "images_per_s"):
        assert column in header
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["method"] == "kd"


def test_eval_every_skips_validation_between(tmp_path):
    out = tmp_path / "s"
    train(Config(method="scratch", epochs=3, eval_every=2, train_fraction=0.1, batch_size=16,
                 max_steps_per_epoch=1, output=str(out), plot=False), quiet=True)
    rows = json.loads((out / "metrics.json").read_text())
    assert ["val_top1" in r for r in rows] == [False, True, True]


def test_config_file_and_flag_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: kd\nepochs: 7\nlr: 0.2\nlr-milestones: [2, 4]\ncompile: false\n")
    cfg = parse_args(["--config", str(yaml_file), "--epochs", "3"])
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.lr_milestones, cfg.compile) == (
        "kd", 3, 0.2, [2, 4], False)
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"method": "topk", "topk": 2, "amp": "bf16"}))
    cfg = parse_args(["--config", str(json_file)])
    assert (cfg.method, cfg.topk, cfg.amp) == ("topk", 2, "bf16")
    cfg = parse_args(["--demo", "--epochs", "5"])
    assert cfg.demo and cfg.epochs == 5 and cfg.train_fraction == 0.1


def test_help_explains_every_flag(capsys):
    from fastkd.train.config import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--teacher-weights" in capsys.readouterr().out


def test_bf16_autocast_on_cpu(tmp_path, cache_dir):
    result = train(tiny("kd", tmp_path / "amp", cache_dir, amp="bf16"), quiet=True)
    assert 0.0 <= result.val_top1 <= 100.0


def test_large_batch_recipe(tmp_path, cache_dir):
    """LARS with linear scaling and warm-up: the learning rate ramps to lr * batch / base."""
    out = tmp_path / "lars"
    train(tiny("kd", out, cache_dir, optimizer="lars", lr_scaling="linear", lr_base_batch=8,
               warmup_epochs=2, epochs=3, max_steps_per_epoch=2), quiet=True)
    rows = json.loads((out / "metrics.json").read_text())
    peak = 0.05 * 16 / 8
    assert [r["lr"] for r in rows[:2]] == pytest.approx([peak * 2 / 4, peak * 4 / 4])


@pytest.mark.slow
def test_compile(tmp_path, cache_dir):
    """--compile: the teacher side and the trained module go through torch.compile."""
    eager = train(tiny("kd", tmp_path / "eager", cache_dir, max_steps_per_epoch=1), quiet=True)
    compiled = train(tiny("kd", tmp_path / "compiled", cache_dir, max_steps_per_epoch=1,
                          compile=True), quiet=True)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"],
                                                             rel=1e-4)


def test_demo_table_and_files(tmp_path, cache_dir, capsys):
    out = tmp_path / "demo"
    code = main([
        "--demo", "--demo-methods", "scratch", "kd", "topk", "--demo-seeds", "0", "1",
        "--epochs", "2", "--max-steps-per-epoch", "2", "--teacher-epochs", "1",
        "--cache-dir", cache_dir, "--output", str(out), "--no-demo-store",
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "val top1 % (mean +- std)" in text and "vs scratch" in text
    assert "(baseline)" in text and "demo total" in text
    summary = json.loads((out / "demo.json").read_text())["summary"]
    assert [s["method"] for s in summary] == ["scratch", "kd", "topk"]
    for s in summary:
        assert len(s["top1"]) == 2 and s["top1_std"] >= 0
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "demo.csv").read_text().startswith("method,top1_mean")
    assert (out / "kd" / "seed1" / "metrics.json").exists()
