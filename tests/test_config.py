"""Config composition: grids from Hydra overrides, and errors that name the option and the fix."""

from __future__ import annotations

import pytest

from w2w.config import ConfigError, cell_id, compose_cell, compose_grid, expand_overrides


def test_grid_expands_in_command_line_order():
    points = expand_overrides(["batch_size=1,2", "max_gen_len=8", "dataset=synthetic,gsm8k"])
    assert points == [
        ["batch_size=1", "max_gen_len=8", "dataset=synthetic"],
        ["batch_size=1", "max_gen_len=8", "dataset=gsm8k"],
        ["batch_size=2", "max_gen_len=8", "dataset=synthetic"],
        ["batch_size=2", "max_gen_len=8", "dataset=gsm8k"],
    ]


def test_cell_id_is_stable_and_ignores_where_results_go():
    a = compose_cell(["batch_size=4", "sweep_dir=/tmp/a"])
    b = compose_cell(["batch_size=4", "sweep_dir=/tmp/b", "cluster=local_slurm"])
    c = compose_cell(["batch_size=8"])
    assert cell_id(a) == cell_id(b) != cell_id(c)
    assert len(compose_grid(["batch_size=4,4,8"])) == 2


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["model=llama_3b"], ["unknown model 'llama_3b'", "llama_65b", "tiny"]),
        (["dataset=pile"], ["unknown dataset 'pile'", "alpaca", "gsm8k", "synthetic"]),
        (["cluster=summit"], ["unknown cluster 'summit'", "local_slurm", "supercloud"]),
        (["batchsize=4"], ["unknown key 'batchsize'", "valid keys are", "batch_size", "cluster.additional_parameters"]),
        (["shards=3"], ["shards=3", "4 heads", "choose shards from [1, 2, 4]"]),
        (["batch_size=0"], ["batch_size=0", ">= 1"]),
        (["precision=int8"], ["precision=int8", "fp32, fp16, bf16"]),
        (["max_gen_len=600"], ["max_gen_len=600", "model.max_seq_len=512"]),
        (["power_cap_w=150"], ["power_cap_w=150", "needs a GPU"]),
        (["top_p=0"], ["top_p=0", "(0, 1]"]),
        (["gpu=v100", "precision=bf16"], ["precision=bf16", "gpu=v100", "use precision=fp16"]),
    ],
)
def test_bad_input_names_the_option(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        compose_cell(overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot parse"):
        expand_overrides(["batch_size=[1,"])
