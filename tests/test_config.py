"""Config composition: grids from Hydra overrides, and errors that name the option and the fix."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from w2w.cell import Cell
from w2w.config import (
    Composer,
    compose_cell,
    compose_grid,
    expand_overrides,
    package_config_dir,
    register_configs,
    split_config_dirs,
)
from w2w.errors import ConfigError

# Cell ids name the folders of existing sweeps: these were computed by w2w before the typed cell.
GOLDEN_IDS = [
    ([], "66ed61e0b15d"),
    (["model=llama_7b", "gpu=a100", "shards=4", "batch_size=64", "max_gen_len=512", "power_cap_w=250"],
     "7ffe75f320b7"),
    # engine=reference (4ca1469e4ece before the rename) is now llama2: its cells get new ids and rerun.
    (["model=llama2_70b", "gpu=h100", "shards=8", "engine=llama2", "precision=bf16", "cluster=slurm_h100",
      "save_responses=true"], "a12d97b822ae"),
    (["model=llama3_1_8b", "gpu=h100", "dataset=synthetic", "temperature=0.6", "top_p=0.9", "greedy=true",
      "energy.rapl=false"], "543294a51c05"),
    (["model=tiny", "shards=2", "precision=fp32", "batch_size=4", "max_gen_len=16", "dataset.num_prompts=16",
      "sweep_dir=/tmp/x"], "c710da83be43"),
]


# Issue 16: dataset.max_prompt_tokens' default went from 128 (cut, BOS lost) to None (kept whole). The
# earlier sweeps' cells ran at 128: set explicitly, it keeps their ids (GOLDEN_IDS); at the new default
# a cell measures something else, under a new id (NEW_DEFAULT_IDS).
NEW_DEFAULT_IDS = ["fd01e176789c", "b270f287c2cc", "df51ebe89d85", "2ca52ef64752", "017e61f4e9f6"]


@pytest.mark.parametrize(("overrides", "cid"), GOLDEN_IDS)
def test_cell_ids_are_those_of_earlier_sweeps(overrides, cid):
    assert compose_cell([*overrides, "dataset.max_prompt_tokens=128"]).id == cid


@pytest.mark.parametrize(("overrides", "cid"), [(o, c) for (o, _), c in zip(GOLDEN_IDS, NEW_DEFAULT_IDS, strict=True)])
def test_prompts_kept_whole_by_default_are_new_cells(overrides, cid):
    assert compose_cell(overrides).id == cid


def test_a_cell_is_one_frozen_typed_object_that_pickles():
    import dataclasses
    import pickle

    cell = compose_cell(["batch_size=4", "power_cap_w=250", "gpu=a100"])
    assert isinstance(cell, Cell) and cell.batch_size == 4 and cell.power_cap_w == 250.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.batch_size = 8  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(cell))  # submitit pickles a job's cells
    assert again == cell and again.id == cell.id
    assert dataclasses.replace(cell, batch_size=8).id != cell.id


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
    assert a.id == b.id != c.id
    assert len(compose_grid(["batch_size=4,4,8"])) == 2


def test_an_option_that_only_flags_is_not_in_the_cell_id():
    # Issue 28: energy.min_window_periods only flags short windows; changing it measured the cells again.
    base = compose_cell(["batch_size=4"])
    assert compose_cell(["batch_size=4", "energy.min_window_periods=3"]).id == base.id
    assert compose_cell(["batch_size=4", "energy.min_window_periods=0"]).id == base.id


@pytest.mark.parametrize("pue", ["inf", "nan", "-inf"])
def test_cluster_pue_must_be_finite(pue):
    with pytest.raises(ConfigError, match=r"cluster\.pue=.*must be finite and >= 1"):
        compose_cell([f"cluster.pue={pue}"])


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
        (["engine=turbo"], ["engine=turbo", "valid are fast, llama1, llama2"]),
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


SITE_MODEL = "defaults:\n  - base_model\nname: site_13b\ndim: 5120\nn_layers: 40\nn_heads: 40\nvocab_size: 32000\n"


@pytest.fixture
def site_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "site_13b.yaml").write_text(SITE_MODEL)
    return tmp_path


def test_a_config_dir_adds_presets_by_flag_or_environment(site_dir, monkeypatch):
    assert compose_cell(["model=site_13b"], [site_dir]).model.n_layers == 40
    with pytest.raises(ConfigError, match="unknown model 'site_13b'"):
        compose_cell(["model=site_13b"])
    monkeypatch.setenv("W2W_CONFIG_DIR", str(site_dir))
    assert compose_grid(["model=site_13b,tiny"])[0].model.dim == 5120
    with pytest.raises(ConfigError, match=r"valid options for model= are .*site_13b.*tiny"):
        compose_cell(["model=site_7b"])


def test_a_config_dir_that_is_missing_or_shadows_a_preset_is_refused(site_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--config-dir=/nonexistent is not a directory"):
        compose_cell([], ["/nonexistent"])
    (site_dir / "model" / "tiny.yaml").write_text(SITE_MODEL)
    monkeypatch.setenv("W2W_CONFIG_DIR", str(site_dir))
    with pytest.raises(ConfigError, match=r"W2W_CONFIG_DIR=.*model/tiny.yaml has the name of .*conf/model/tiny.yaml"):
        compose_cell([])


def test_config_dir_arguments_are_taken_out_of_the_overrides():
    assert split_config_dirs(["--config-dir", "a", "x=1", "--config-dir=b"]) == (["a", "b"], ["x=1"])
    with pytest.raises(ConfigError, match="--config-dir needs a directory"):
        split_config_dirs(["--config-dir"])


def _hydra_compose(overrides: list[str]):
    """Hydra's own compose of one override list: what the cached composition must equal."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(package_config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def test_cached_composition_equals_hydra_per_cell():
    composer = Composer()
    points = [p for part in composer.subgrids(["+experiment=paper_all"]) for p in expand_overrides(part)]
    points = [*points[::9], ["model=llama_7b", "model.dim=128", "++energy.idle_seconds=0", "gpu=h100"],
              ["+cluster.additional_parameters.mail_type=END", "cluster=supercloud", "shards=2"]]
    for point in points:
        ours, hydra = composer.compose(point), _hydra_compose(point)
        assert OmegaConf.to_container(ours) == OmegaConf.to_container(hydra), point
        assert OmegaConf.is_struct(ours) and ours._metadata.object_type is hydra._metadata.object_type
    assert len(composer._bases) < len(points)  # shared by cells with the same group choices
