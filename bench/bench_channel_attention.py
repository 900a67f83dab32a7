"""pytest-benchmark suite: ``fastkd.channel_attention_loss`` against PyTorch eager and
``torch.compile``, on the cases of ``python -m fastkd bench --loss channel_attention`` (see
``bench/_suite.py``). The normal test run skips it (``--benchmark-skip`` in pyproject's addopts);
run it with::

    pytest bench/bench_channel_attention.py --benchmark-only
    pytest bench/bench_channel_attention.py --benchmark-only -k "stages and fwdbwd and not compile"
"""

from _suite import loss_benchmark

test_channel_attention = loss_benchmark("channel_attention")
