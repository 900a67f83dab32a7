"""Bad configurations and bad checkpoints fail at start with a clear message."""

import pytest
import torch

from fastkd.train import CheckpointError, Config, ConfigError, parse_args, train
from fastkd.train.__main__ import main
from fastkd.train.config import resolve


def scratch(output, **kw):
    values = dict(method="scratch", epochs=1, train_fraction=0.1, batch_size=32,
                  max_steps_per_epoch=1, output=str(output), plot=False)
    values.update(kw)
    return Config(**values)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    ([], "--method is required"),
    (["--method", "kd", "--epochs", "0"], "must be a positive integer"),
    (["--method", "kd", "--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--method", "kd", "--lr", "-1"], "--lr must be finite and >= 0"),
    (["--method", "kd", "--lr", "0"], "--lr must be > 0"),
    (["--method", "kd", "--alpha", "1.5"], "--alpha must be in"),
    (["--method", "kd", "--temperature", "0"], "--temperature must be > 0"),
    (["--method", "kd", "--train-fraction", "0"], "--train-fraction must be in"),
    (["--method", "kd", "--lr-schedule", "step"], "needs --lr-milestones"),
    (["--method", "kd", "--data", "/nonexistent/imagenet"], "no such directory"),
    (["--method", "kd", "--teacher-weights", __file__, __file__], "distils one teacher"),
    (["--demo", "--data", "."], "--demo runs on the embedded digits"),
    (["--method", "nd", "--epochs", "4", "--nd-block-epochs", "4"], "must be fewer than --epochs"),
])
def test_rejected_at_start(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(parse_args(argv))


def test_data_folder_layout(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="must hold val/<class>/ folders"):
        resolve(parse_args(["--method", "scratch", "--data", str(tmp_path), "--student",
                            "resnet18"]))
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="needs --teacher-weights PATH"):
        resolve(parse_args(["--method", "kd", "--data", str(tmp_path), "--student", "resnet18",
                            "--teacher", "resnet34"]))
    with pytest.raises(ConfigError, match="needs --student"):
        resolve(parse_args(["--method", "scratch", "--data", str(tmp_path)]))
    with pytest.raises(ConfigError, match="--train-fraction applies to the embedded data"):
        resolve(parse_args(["--method", "scratch", "--data", str(tmp_path), "--student",
                            "resnet18", "--train-fraction", "0.5"]))


def test_batch_must_divide_over_ranks():
    with pytest.raises(ConfigError, match="must divide evenly over the 4 ranks"):
        resolve(Config(method="kd", batch_size=30), world_size=4)


def test_batch_larger_than_the_training_set(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(scratch(tmp_path / "s", batch_size=512), quiet=True)


def test_builtin_models_only_on_embedded_data(tmp_path):
    with pytest.raises(ConfigError, match="the models are the built-in"):
        train(scratch(tmp_path / "s", student="resnet18"), quiet=True)


def test_topk_must_drop_classes(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"never read")
    with pytest.raises(ConfigError, match="keeps every one of the 10 classes"):
        train(Config(method="topk", topk=10, output=str(tmp_path / "t"),
                     teacher_weights=[str(weights)]), quiet=True)


def test_teacher_weights_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        train(Config(method="kd", output=str(tmp_path / "t"),
                     teacher_weights=[str(tmp_path / "missing.pt")]), quiet=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt as a state dict"):
        train(Config(method="kd", output=str(tmp_path / "t"), teacher_weights=[str(junk)]),
              quiet=True)


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        train(scratch(tmp_path / "s", amp="fp16"), quiet=True)
    with pytest.raises(ConfigError, match="no CUDA device"):
        train(scratch(tmp_path / "s", device="cuda"), quiet=True)


def test_output_holding_a_run_needs_resume_or_overwrite(tmp_path):
    train(scratch(tmp_path / "s"), quiet=True)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(scratch(tmp_path / "s"), quiet=True)
    train(scratch(tmp_path / "s", overwrite=True), quiet=True)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(scratch(tmp_path / "s", resume="auto"), quiet=True)


def test_corrupt_checkpoint(tmp_path):
    out = tmp_path / "s"
    train(scratch(out), quiet=True)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint"):
        train(scratch(out, resume="auto"), quiet=True)
    torch.save({"epoch": 3}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a fastkd trainer checkpoint"):
        train(scratch(out, resume="auto"), quiet=True)


def test_mismatched_checkpoint(tmp_path):
    out = tmp_path / "s"
    train(scratch(out, epochs=2), quiet=True)
    with pytest.raises(CheckpointError, match="different configuration.*lr: checkpoint 0.05, now"):
        train(scratch(out, epochs=2, lr=0.1, resume="auto"), quiet=True)
    with pytest.raises(CheckpointError, match="method: checkpoint 'scratch', now 'kd'"):
        train(scratch(out, epochs=2, method="kd", resume="auto"), quiet=True)


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("method: kd\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        parse_args(["--config", str(bad_key)])
    bad_value = tmp_path / "b.json"
    bad_value.write_text('{"method": "kd", "epochs": -3}')
    with pytest.raises(ConfigError, match="b.json: argument --epochs: must be a positive"):
        parse_args(["--config", str(bad_value)])
    broken = tmp_path / "c.yaml"
    broken.write_text("method: [kd\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_args(["--config", str(broken)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "none.yaml")])


def test_main_reports_errors_with_status_2(capsys):
    assert main(["--method", "kd", "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "error: --data: no such directory" in err
    assert "Traceback" not in err


# -- one definition per option -----------------------------------------------------------------

def test_every_option_is_one_config_field_with_one_flag():
    import dataclasses

    from fastkd.train.config import OPTIONS, build_parser

    fields = [f.name for f in dataclasses.fields(Config)]
    assert list(OPTIONS) == fields
    flags = {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}
    assert set(flags) == set(fields)
    for name in fields:
        assert "--" + name.replace("_", "-") in flags[name]


@pytest.mark.parametrize("name", ["demo", "overwrite", "compile", "channels_last", "plot",
                                  "progress"])
@pytest.mark.parametrize("value", [True, False])
def test_every_boolean_from_flags_and_config_files(name, value, tmp_path):
    flag = "--" + ("" if value else "no-") + name.replace("_", "-")
    assert getattr(parse_args(["--method", "kd", flag]), name) is value
    for key in (name, name.replace("_", "-")):
        file = tmp_path / "c.yaml"
        file.write_text(f"method: kd\n{key}: {str(value).lower()}\n")
        assert getattr(parse_args(["--config", str(file)]), name) is value


def test_config_file_boolean_must_be_a_boolean(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("method: kd\nplot: 'no'\n")
    with pytest.raises(ConfigError, match="plot in .* must be true or false, got 'no'"):
        parse_args(["--config", str(file)])


def test_every_option_works_from_a_config_file(tmp_path):
    """Each option's own value, written to a file, comes back through the parser unchanged."""
    import dataclasses
    import json

    from fastkd.train.config import OPTIONS

    values = {"method": "kd", "demo_seeds": [4, 5], "demo_methods": ["kd"], "demo_store": False,
              "data": "d", "augment": True, "teacher_store": "ts", "crops": 3,
              "synthetic_images": 7, "synthetic_classes": 3, "train_fraction": 0.5,
              "image_size": 32, "teacher": "t", "student": "s", "teacher_weights": ["w"],
              "teacher_epochs": 2, "cache_dir": "c", "epochs": 3, "batch_size": 4, "lr": 0.5,
              "optimizer": "adamw", "momentum": 0.5, "weight_decay": 0.25,
              "lr_schedule": "step", "lr_milestones": [1, 2], "lr_gamma": 0.5,
              "lr_scaling": "linear", "lr_base_batch": 8, "warmup_epochs": 0.5,
              "label_smoothing": 0.125, "seed": 9, "temperature": 2.0, "alpha": 0.5,
              "cd_weight": 2.0, "cd_decay": 0.5, "cd_decay_every": 2, "cd_kd_start": 1,
              "cd_ce_weight": 0.5, "cd_gkd_weight": 0.25, "dih_head_epochs": 2,
              "dih_head_lr": 0.01, "feed_teachers": 3, "feed_beta": 10.0, "nd_block_epochs": 1,
              "topk": 2, "device": "cpu", "amp": "bf16", "compile": True,
              "channels_last": True, "workers": 2, "threads": 3, "loss_backend": "torch",
              "max_steps_per_epoch": 5, "profile_steps": 1, "output": "o", "overwrite": True,
              "resume": "r", "checkpoint_every": 4, "stop_after_steps": 6, "log_interval": 7,
              "eval_every": 2, "plot": False, "progress": True}
    in_file = {n for n, o in OPTIONS.items() if o.in_file and n != "demo"}
    assert set(values) == in_file
    file = tmp_path / "all.json"
    file.write_text(json.dumps(values))
    cfg = parse_args(["--config", str(file)])
    assert {k: v for k, v in dataclasses.asdict(cfg).items() if k in values} == values


def test_resume_checks_exactly_the_options_that_change_the_computation():
    from fastkd.train.checkpoint import check_matches
    from fastkd.train.config import OPTIONS, RUNTIME_FIELDS

    assert RUNTIME_FIELDS == {n for n, o in OPTIONS.items() if o.runtime}
    assert {"output", "resume", "device", "workers", "plot", "progress"} <= RUNTIME_FIELDS
    assert not {"lr", "epochs", "method", "seed", "amp", "eval_every"} & RUNTIME_FIELDS
    saved = Config(method="kd").to_dict()
    check_matches(saved, Config(method="kd", output="elsewhere", workers=3).to_dict(), "c.pt")
    with pytest.raises(CheckpointError, match="temperature: checkpoint None, now 2.0"):
        check_matches(saved, Config(method="kd", temperature=2.0).to_dict(), "c.pt")


def test_loss_backends_come_from_fastkd_backends():
    import fastkd.backends
    from fastkd.train.config import OPTIONS

    assert OPTIONS["loss_backend"].choices == tuple(fastkd.backends.CHOICES)


@pytest.mark.parametrize("kw, message", [
    (dict(optimizer="rmsprop"), "--optimizer must be one of sgd, adamw, lars, lamb"),
    (dict(demo_methods=["kd", "x"]), "--demo-methods must be one of"),
    (dict(loss_backend="fast"), "--loss-backend must be one of"),
    (dict(topk=0), "--topk must be a positive integer, got 0"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0, got -1"),
    (dict(epochs=2.5), "--epochs must be an integer"),
    (dict(momentum=float("nan")), "--momentum must be finite and >= 0"),
])
def test_python_configs_get_the_flags_checks(kw, message):
    with pytest.raises(ConfigError, match=message):
        resolve(Config(method="kd", **kw))
