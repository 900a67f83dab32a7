"""The CPU block cache behind fastkd's large CPU outputs (fastkd.memory)."""

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import fastkd
from fastkd import memory

MIB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts with an empty cache at a 2 GiB limit (whatever FASTKD_CPU_CACHE_MB says)
    and leaves the limit as it found it."""
    limit = memory.cpu_cache_info()["limit_bytes"]
    gc.collect()  # tensors of earlier tests held in reference cycles must not land mid-test
    memory.set_cpu_cache_limit(2048 * MIB)
    memory.empty_cpu_cache()
    yield
    gc.collect()
    memory.set_cpu_cache_limit(limit)
    memory.empty_cpu_cache()


def regression_grad(nbytes: int, dtype=torch.float32) -> torch.Tensor:
    """The gradient of a feature-regression loss over a student of `nbytes` (written by the op's
    forward, so it comes from the cache when large enough)."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    student = torch.randn(4, n // 4, dtype=dtype, requires_grad=True)
    fastkd.feature_regression_loss(student, torch.randn_like(student), backend="cpu").backward()
    return student.grad


def counts():
    info = memory.cpu_cache_info()
    return info["hits"], info["misses"]


def test_freed_gradient_block_is_reused():
    hits, misses = counts()
    grad = regression_grad(4 * MIB)
    ptr = grad.data_ptr()
    assert counts() == (hits, misses + 1)
    del grad
    assert memory.cpu_cache_info()["cached_bytes"] == 4 * MIB
    again = regression_grad(4 * MIB)
    assert again.data_ptr() == ptr
    assert counts() == (hits + 1, misses + 1)
    assert memory.cpu_cache_info()["cached_bytes"] == 0


@pytest.mark.parametrize("loss", ["kd", "channel_attention", "channel_attention_cl", "regression"])
def test_every_cpu_gradient_goes_through_the_cache(loss):
    if loss == "kd":
        student = torch.randn(512, 1024, requires_grad=True)
        out = fastkd.kd_loss(student, torch.randn(512, 1024), temperature=2.0, backend="cpu")
    elif loss.startswith("channel_attention"):
        fmt = torch.channels_last if loss.endswith("cl") else torch.contiguous_format
        student = torch.randn(8, 32, 32, 32).to(memory_format=fmt).requires_grad_()
        out = fastkd.channel_attention_loss(student, torch.randn(8, 32, 16, 16), backend="cpu")
    else:
        student = torch.randn(8, 32, 32, 32).to(memory_format=torch.channels_last)
        student.requires_grad_()
        out = fastkd.feature_regression_loss(student, torch.randn_like(student), backend="cpu")
    hits, misses = counts()
    out.backward()
    grad = student.grad
    if loss.startswith("channel_attention"):  # KD and regression write it in the forward
        assert counts() == (hits, misses + 1)
    assert grad.stride() == student.stride()  # the layout is kept
    del grad
    student.grad = None
    assert memory.cpu_cache_info()["cached_bytes"] >= MIB


def test_small_outputs_bypass_the_cache():
    before = counts()
    grad = regression_grad(MIB // 2)
    del grad
    assert counts() == before
    assert memory.cpu_cache_info()["cached_bytes"] == 0


def test_a_block_serves_requests_down_to_seven_eighths_of_its_size():
    freed_ptr = regression_grad(8 * MIB).data_ptr()
    assert regression_grad(7 * MIB).data_ptr() == freed_ptr  # 8 MiB - 1 MiB: reused
    memory.empty_cpu_cache()
    regression_grad(8 * MIB)
    hits, misses = counts()
    regression_grad(7 * MIB - 64 * 1024)  # less than 7/8 of the block: not served by it
    assert counts() == (hits, misses + 1)


def test_limit_zero_turns_the_cache_off():
    memory.set_cpu_cache_limit(0)
    grad = regression_grad(2 * MIB)
    del grad
    assert memory.cpu_cache_info()["cached_bytes"] == 0


def test_least_recently_freed_blocks_are_released_first():
    memory.set_cpu_cache_limit(5 * MIB)
    a, b, c = (regression_grad(2 * MIB) for _ in range(3))
    ptr_b, ptr_c = b.data_ptr(), c.data_ptr()
    del a, b, c  # freed in the order a, b, c: a is released to make room for c
    assert memory.cpu_cache_info()["cached_bytes"] == 4 * MIB
    x, y = regression_grad(2 * MIB), regression_grad(2 * MIB)
    assert {x.data_ptr(), y.data_ptr()} == {ptr_b, ptr_c}


def test_lowering_the_limit_and_emptying_release_blocks():
    grads = [regression_grad(2 * MIB) for _ in range(3)]
    del grads
    assert memory.cpu_cache_info()["cached_bytes"] == 6 * MIB
    memory.set_cpu_cache_limit(3 * MIB)
    assert memory.cpu_cache_info()["cached_bytes"] == 2 * MIB
    memory.empty_cpu_cache()
    assert memory.cpu_cache_info()["cached_bytes"] == 0
    assert memory.cpu_cache_info()["limit_bytes"] == 3 * MIB


def test_a_block_over_the_limit_is_not_kept():
    memory.set_cpu_cache_limit(2 * MIB)
    grad = regression_grad(4 * MIB)
    del grad
    assert memory.cpu_cache_info()["cached_bytes"] == 0


def test_cached_gradients_are_ordinary_tensors():
    grad = regression_grad(4 * MIB, dtype=torch.bfloat16)
    expected = grad.clone()
    grad.add_(1.0)
    torch.testing.assert_close(grad, expected + 1.0)
    grad.resize_(8 * MIB // 2)  # resizing goes through the same allocator
    assert grad.numel() == 4 * MIB
    grad.fill_(2.0)
    assert grad.float().sum().item() == 8 * MIB


def test_concurrent_use_from_threads():
    errors = []

    def work():
        try:
            for _ in range(10):
                student = torch.randn(4, 64, 32, 32, requires_grad=True)
                teacher = torch.randn(4, 64, 32, 32)
                fastkd.feature_regression_loss(student, teacher, backend="cpu").backward()
                torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() /
                                           student.numel())
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    in_use = memory.cpu_cache_info()["in_use_bytes"]
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = memory.cpu_cache_info()
    assert info["in_use_bytes"] == in_use  # every block handed out came back
    assert 0 < info["cached_bytes"] <= 4 * MIB  # at most one block per thread was live at once


def test_lazy_clone_of_a_cached_gradient():
    """Copy-on-write clones need a "simple" DataPtr (context == data): the block comes back once
    both owners are gone, and writing to the clone copies it first."""
    in_use = memory.cpu_cache_info()["in_use_bytes"]
    grad = regression_grad(2 * MIB)
    expected = grad.clone()
    clone = grad._lazy_clone()
    del grad
    torch.testing.assert_close(clone, expected)
    clone.add_(1.0)
    torch.testing.assert_close(clone, expected + 1.0)
    del clone
    assert memory.cpu_cache_info()["in_use_bytes"] == in_use


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_the_cache():
    kept = regression_grad(2 * MIB)  # a block in use while forking
    regression_grad(2 * MIB)  # and one cached
    pid = os.fork()
    if pid == 0:  # the child: free, reuse and allocate, then report through the exit status
        try:
            torch.set_num_threads(1)
            del kept
            a, b = regression_grad(2 * MIB), regression_grad(2 * MIB)
            ok = memory.cpu_cache_info()["hits"] >= 2 and a.data_ptr() != b.data_ptr()
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    del kept


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ("1", TypeError),
                                        (True, TypeError)])
def test_bad_limit_is_refused(bad, error):
    with pytest.raises(error, match="nbytes"):
        memory.set_cpu_cache_limit(bad)


@pytest.mark.parametrize("value, limit, warns", [("0", 0, False), ("16", 16 * MIB, False),
                                                 ("lots", 2048 * MIB, True),
                                                 ("-3", 2048 * MIB, True)])
def test_limit_from_the_environment(value, limit, warns):
    code = "import fastkd; print(fastkd.memory.cpu_cache_info()['limit_bytes'])"
    env = dict(os.environ, FASTKD_CPU_CACHE_MB=value)
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert int(run.stdout.strip().splitlines()[-1]) == limit
    assert ("FASTKD_CPU_CACHE_MB" in run.stderr) == warns


def test_cached_blocks_show_in_the_memory_profiler():
    from torch.profiler import ProfilerActivity, profile

    student = torch.randn(8, 32, 32, 32, requires_grad=True)
    loss = fastkd.channel_attention_loss(student, torch.randn(8, 32, 32, 32), backend="cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
        student.grad = None  # freed inside the profiled region: reported as -1 MiB
    usage = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
    assert usage["fastkd::channel_attention_bwd"] >= MIB
    assert usage["[memory]"] <= -MIB
