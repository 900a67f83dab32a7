"""Teacher store on generated JPEG folders with torchvision models: build, exact replay of the
PIL crops, training and resuming from the store, refusals."""

import json

import numpy as np
import pytest
import torch
from test_train_imagefolder import image_root, weights_file  # noqa: F401 (a fixture)
from test_train_reliability import assert_same_run

from fastkd.train import Config, Interrupted, train
from fastkd.train import store as st
from fastkd.train.config import resolve
from fastkd.train.store_build import build


@pytest.fixture(scope="module")
def folder_store(image_root, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("folder-store")
    weights = weights_file(tmp, "resnet18")
    path = tmp / "store"
    # 18 training images in chunks of 6, two crops each.
    build(Config(method="kd", data=str(image_root), teacher="resnet18",
                    teacher_weights=[weights], student="resnet18", image_size=32,
                    output=str(path), crops=2, topk=2, batch_size=6, workers=1, threads=1,
                    progress=False), log=lambda s: None)
    return path, weights


def run_cfg(root, store_dir, output, **kw):
    values = dict(method="kd", data=str(root), teacher="resnet18", student="resnet18",
                  teacher_store=str(store_dir), image_size=32, batch_size=6, epochs=2,
                  workers=1, threads=1, output=str(output), plot=False)
    values.update(kw)
    return Config(**values)


def test_folder_store_layout(folder_store):
    path, _ = folder_store
    meta = json.loads((path / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["num_images"] == 18
    assert meta["transform"]["size"] == 32 and meta["transform"]["scale"] == [0.08, 1.0]
    assert "Normalize" in meta["transform"]["after"]
    boxes = np.load(path / "boxes.npy")
    # 40x48 images: every box lies inside the image.
    assert (boxes[..., 0] + boxes[..., 2] <= 40).all()
    assert (boxes[..., 1] + boxes[..., 3] <= 48).all()


def test_folder_replay_is_exact(image_root, folder_store, tmp_path):  # noqa: F811
    path, weights = folder_store
    cfg = resolve(run_cfg(image_root, path, tmp_path / "x", teacher_weights=[weights]))
    src = st.source(cfg)
    replay = st.ReplayDataset(src, st.open_for_run(cfg, src, None), seed=3)
    built = st._BuildImages(src, 2, seed=0)
    for epoch in (0, 1):
        replay.set_epoch(epoch)
        for index in (0, 7, 17):
            x, y, _, _ = replay[index]
            crops, _ = built[index]
            assert torch.equal(x, crops[st.slot_of(3, epoch, index, 2)])
            assert y.item() == src.images.samples[index][1]


def test_train_and_resume_from_folder_store(image_root, folder_store, tmp_path):  # noqa: F811
    path, weights = folder_store
    full = tmp_path / "full"
    # The store stands in for the teacher: no --teacher-weights needed (then its name alone is
    # checked); given, its hash must match.
    train(run_cfg(image_root, path, full), quiet=True)
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(run_cfg(image_root, path, part, teacher_weights=[weights], stop_after_steps=4),
              quiet=True)
    train(run_cfg(image_root, path, part, teacher_weights=[weights], resume="auto"), quiet=True)
    assert_same_run(full, part)


def test_folder_store_mismatches(image_root, folder_store, tmp_path):  # noqa: F811
    path, _ = folder_store
    with pytest.raises(st.StoreError, match="transform: store .*'size': 32.*this run .*'size': 40"):
        train(run_cfg(image_root, path, tmp_path / "a", image_size=40), quiet=True)
    with pytest.raises(st.StoreError, match="teacher: store 'resnet18', this run 'resnet34'"):
        train(run_cfg(image_root, path, tmp_path / "b", teacher="resnet34"), quiet=True)
    torch.manual_seed(12345)
    other = weights_file(tmp_path, "resnet18")  # another random initialisation
    with pytest.raises(st.StoreError, match="teacher_sha256"):
        train(run_cfg(image_root, path, tmp_path / "c", teacher_weights=[other]), quiet=True)
