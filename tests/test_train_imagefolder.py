"""ImageNet-layout folders with torchvision models: generated JPEGs, tiny image size."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastkd.train import Config, ConfigError, train

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class colour, so there is something to learn
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def weights_file(tmp_path, name, classes=3):
    model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    path = tmp_path / f"{name}-{classes}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def run_cfg(root, tmp_path, method, teacher, student, **kw):
    values = dict(
        method=method, data=str(root), teacher=teacher, student=student, image_size=32,
        batch_size=6, epochs=1, workers=1, threads=1, output=str(tmp_path / method), plot=False,
        teacher_weights=[weights_file(tmp_path, teacher)] if method != "scratch" else [],
        dih_head_epochs=1,
    )
    values.update(kw)
    return Config(**values)


def test_kd_resnet(image_root, tmp_path):
    result = train(run_cfg(image_root, tmp_path, "kd", "resnet34", "resnet18"), quiet=True)
    assert 0.0 <= result.val_top1 <= 100.0
    rows = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["val_top5"] == 100.0  # 3 classes: top-5 is everything
    student = torchvision.models.resnet18(num_classes=3)
    student.load_state_dict(torch.load(tmp_path / "kd" / "student.pt", weights_only=True))


def test_dih_with_feature_extraction(image_root, tmp_path):
    """MobileNetV3's stages come from torchvision's feature extraction (no ResNet split)."""
    cfg = run_cfg(image_root, tmp_path, "dih", "mobilenet_v3_small", "mobilenet_v3_small",
                  channels_last=True)
    train(cfg, quiet=True)
    rows = json.loads((tmp_path / "dih" / "metrics.json").read_text())
    assert [r["phase"] for r in rows] == ["heads", "student"]
    assert {"val_head1_top1", "val_head4_top1"} <= set(rows[0])


def test_augmentation_does_not_depend_on_workers(image_root, tmp_path):
    a = train(run_cfg(image_root, tmp_path / "a", "scratch", None, "resnet18", workers=0),
              quiet=True)
    b = train(run_cfg(image_root, tmp_path / "b", "scratch", None, "resnet18", workers=2),
              quiet=True)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


@pytest.mark.parametrize("method", ["cd", "nd"])
def test_feature_methods_resnet(image_root, tmp_path, method):
    train(run_cfg(image_root, tmp_path, method, "resnet34", "resnet18", nd_block_epochs=1,
                  epochs=2), quiet=True)


def test_class_count_mismatch(image_root, tmp_path):
    cfg = run_cfg(image_root, tmp_path, "kd", "resnet18", "resnet18",
                  teacher_weights=[weights_file(tmp_path, "resnet18", classes=5)])
    with pytest.raises(ConfigError, match="classify 5 classes but the data has 3"):
        train(cfg, quiet=True)


def test_weights_of_another_architecture(image_root, tmp_path):
    cfg = run_cfg(image_root, tmp_path, "kd", "resnet18", "resnet18",
                  teacher_weights=[weights_file(tmp_path, "resnet34")])
    with pytest.raises(ConfigError, match="weights do not fit the model"):
        train(cfg, quiet=True)


def test_nd_needs_matching_stages(image_root, tmp_path):
    cfg = run_cfg(image_root, tmp_path, "nd", "resnet18", "resnet50", epochs=2)
    with pytest.raises(ConfigError, match="stage shapes must match"):
        train(cfg, quiet=True)


def test_feature_method_on_a_model_without_known_stages(image_root, tmp_path):
    cfg = run_cfg(image_root, tmp_path, "dih", "shufflenet_v2_x0_5", "resnet18")
    with pytest.raises(ConfigError, match="stage outputs"):
        train(cfg, quiet=True)


def test_unknown_torchvision_model(image_root, tmp_path):
    cfg = run_cfg(image_root, tmp_path, "scratch", None, "resnet1800")
    with pytest.raises(ConfigError, match="unknown torchvision classification model.*resnet18"):
        train(cfg, quiet=True)


def test_train_and_val_classes_differ(image_root, tmp_path):
    owl = image_root / "val" / "owl"
    owl.mkdir()
    Image.new("RGB", (40, 40)).save(owl / "0.jpg")
    try:
        with pytest.raises(ConfigError, match="same class folders.*only in val: \\['owl'\\]"):
            train(run_cfg(image_root, tmp_path, "scratch", None, "resnet18"), quiet=True)
    finally:
        (owl / "0.jpg").unlink()
        owl.rmdir()


def test_synthetic_data_needs_no_weights(tmp_path):
    out = tmp_path / "syn"
    train(Config(method="cd", data="synthetic", teacher="resnet34",
                 student="resnet18", image_size=32, synthetic_images=24, synthetic_classes=7,
                 batch_size=8, epochs=1, workers=0, threads=1, profile_steps=2, output=str(out),
                 plot=False), quiet=True)
    profile = json.loads((out / "profile.json").read_text())
    assert profile["steps"] == 2 and profile["images"] == 16
