"""Every shipped Accelerate config loads with Accelerate's own parser and quotes what must be quoted."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "accelerate_configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    raw = yaml.safe_load(open(path))
    # Unquoted `no` / `NO` become False in YAML (1.1) and `accelerate launch` then fails on them.
    assert raw["distributed_type"] is not False and raw.get("mixed_precision") is not False
    assert config.num_processes >= 1
    assert "accelerate launch" in open(path).read()  # each config says how it is used


def test_two_process_cpu_config_really_starts_two_ranks():
    raw = yaml.safe_load(open(os.path.join(REPO, "accelerate_configs", "cpu_two_process.yaml")))
    assert raw["distributed_type"] == "MULTI_GPU" and raw["use_cpu"] is True and raw["num_processes"] == 2
