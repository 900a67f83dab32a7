"""pytest-benchmark suite: ``fastkd.linear_kd_loss`` (fused LM head) against PyTorch eager,
``torch.compile`` and Liger-Kernel, on the cases of ``python -m fastkd bench --loss
linear_kd_loss`` (see ``bench/_suite.py``). The normal test run skips it (``--benchmark-skip`` in
pyproject's addopts); run it with::

    pytest bench/bench_linear_kd_loss.py --benchmark-only

Time and peak memory, each case in a fresh process (the README's table)::

    python -m fastkd bench-head --json bench/results/<dir>/head.json
"""

from _suite import loss_benchmark

test_linear_kd_loss = loss_benchmark("linear_kd_loss")
