"""gradgate demo --convnet trains a convnet remotely on scikit-learn's bundled digits to >= 0.95
test accuracy; gradgate ops lists the new ops."""
from __future__ import annotations

import re

import pytest

from gradgate.cli import main

from optional import require


def test_demo_convnet_reaches_the_stated_test_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    require("sklearn", "pip install 'gradgate[examples]'")
    assert main(["demo", "--convnet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy: ([0-9.]+) on 360 held-out images", out).group(1))
    assert accuracy >= 0.95, out
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert last < 0.2 * first


def test_ops_command_lists_the_network_ops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert {"conv2d", "max_pool2d", "avg_pool2d", "batchnorm", "layernorm", "dropout", "affine"} <= set(lines)
    assert "stride=1" in lines["conv2d"] and "momentum=0.9" in lines["batchnorm"]
