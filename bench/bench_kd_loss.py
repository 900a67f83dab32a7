"""pytest-benchmark suite: ``fastkd.kd_loss`` against PyTorch eager and ``torch.compile``, on the
cases of ``python -m fastkd bench --loss kd_loss`` (see ``bench/_suite.py``). The normal test run
skips it (``--benchmark-skip`` in pyproject's addopts); run it with::

    pytest bench/bench_kd_loss.py --benchmark-only
    pytest bench/bench_kd_loss.py --benchmark-only -k "bf16 and fwdbwd and not compile"
"""

from _suite import loss_benchmark

test_kd_loss = loss_benchmark("kd_loss")
