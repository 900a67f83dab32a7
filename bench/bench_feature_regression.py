"""pytest-benchmark suite: ``fastkd.feature_regression_loss`` against PyTorch eager and
``torch.compile``, on the cases of ``python -m fastkd bench --loss feature_regression`` (MSE and
normalised L1 on single maps and on four ResNet stages in one call, NCHW and channels_last; see
``bench/_suite.py``). The normal test run skips it (``--benchmark-skip`` in pyproject's addopts);
run it with::

    pytest bench/bench_feature_regression.py --benchmark-only
    pytest bench/bench_feature_regression.py --benchmark-only -k "feed-cl and fwdbwd"
"""

from _suite import loss_benchmark

test_feature_regression = loss_benchmark("feature_regression")
