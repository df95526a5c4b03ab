"""The published values of the study (CITATION below) as data: the one place the report takes them from."""

from __future__ import annotations

from dataclasses import dataclass

CITATION = ("Samsi et al., \"From Words to Watts: Benchmarking the Energy Costs of Large Language Model "
            "Inference\", IEEE HPEC 2023, arXiv 2310.03003")

# What each of the paper's GPU kinds was (their Setup section), keyed by our gpu profile name.
HARDWARE = {
    "v100": "V100 32 GB (250 W TDP), 2 per node, MIT Supercloud, 25 Gb/s Ethernet",
    "a100": "A100 80 GB (300 W TDP), MIT Supercloud, 25 Gb/s Ethernet",
}
DEFAULT_CAP_W = 250.0  # "GPUs were capped at 250 W unless stated otherwise"
# How every published number was run: fp16, through Meta's LLaMA-1 code (engine=llama1);
# each table and figure prefers these cells and notes a stand-in.
SCHEDULE = {"precision": "fp16", "engine": "llama1"}
# The closest stand-ins, in order, where a sweep lacks the paper's value: Llama 2's program has
# LLaMA-1's schedule but for the early stop, so it comes before fast (noted like any stand-in).
STAND_INS = {"engine": ("llama2",)}
MODEL_LABELS = {"llama_7b": "7B", "llama_13b": "13B", "llama_65b": "65B"}


@dataclass(frozen=True)
class Setting:
    """A run setting the paper states, compared with what the records say we ran."""

    name: str
    param: str  # the key in a record's params
    value: float


SETTINGS = (
    Setting("prompts per dataset", "num_prompts", 4096),
    Setting("temperature", "temperature", 0.8),
    Setting("top-p", "top_p", 0.95),
)


@dataclass(frozen=True)
class Table2Row:
    """Minimum hardware and max batch at max response length 256 (their Table II)."""

    model: str
    gpu: str
    gpus: int
    max_batch: int
    note: str = ""


TABLE2_MAX_GEN_LEN = 256
TABLE2 = (
    Table2Row("llama_7b", "v100", 1, 64),
    Table2Row("llama_7b", "a100", 1, 64),
    Table2Row("llama_13b", "v100", 2, 64),
    Table2Row("llama_13b", "a100", 1, 64, "the paper's text says 2 GPUs"),
    Table2Row("llama_65b", "v100", 8, 64),
    Table2Row("llama_65b", "a100", 4, 128),
)

# Table III, power capping: 65B on 4 A100 80 GB, GSM8K, batch 64; % change relative to a 250 W cap.
TABLE3_SETUP = {"model": "llama_65b", "gpu": "a100", "shards": 4, "dataset": "gsm8k", "batch_size": 64}
TABLE3_BASE_W = 250.0
TABLE3_CAPS_W = (175.0, 150.0)
TABLE3_QUANTITIES = ("time", "energy", "token_rate")  # total run time, GPU energy, tokens/s
TABLE3: dict[int, dict[tuple[str, float], float]] = {
    256: {("time", 175.0): 6.23, ("time", 150.0): 15.33, ("energy", 175.0): -21.82,
          ("energy", 150.0): -32.76, ("token_rate", 175.0): -5.87, ("token_rate", 150.0): -13.15},
    512: {("time", 175.0): 6.51, ("time", 150.0): 21.70, ("energy", 175.0): -23.95,
          ("energy", 150.0): -34.66, ("token_rate", 175.0): -6.11, ("token_rate", 150.0): -17.83},
    1024: {("time", 175.0): 7.40, ("time", 150.0): 21.65, ("energy", 175.0): -23.87,
           ("energy", 150.0): -34.59, ("token_rate", 175.0): -6.89, ("token_rate", 150.0): -17.80},
}

# Tables IV/V, utilization at batch 64: (max GPU memory utilization %, average SM utilization %).
TABLE4_SETUP = {"model": "llama_65b", "gpu": "a100", "shards": 4, "batch_size": 64}
TABLE4: dict[int, tuple[float, float]] = {  # by max length
    256: (23.36, 95.00), 512: (24.54, 98.81), 1024: (24.85, 98.85), 2048: (27.00, 98.00),
}
TABLE5_SETUP = {"model": "llama_65b", "gpu": "v100", "max_gen_len": 256, "batch_size": 64}
TABLE5: dict[int, tuple[float, float]] = {  # by shard count
    8: (24.25, 94.75), 16: (13.33, 95.00), 32: (6.66, 95.66),
}


@dataclass(frozen=True)
class Finding:
    """A headline number: a point (low == high) or a range, and how ours is computed."""

    key: str  # which computation in analysis/report.py gives ours
    claim: str
    low: float
    high: float
    unit: str
    source: str = "paper"  # or the related study it comes from
    hardware: str = ""  # where the paper's number came from; "" = HARDWARE of the cells


FINDINGS = (
    Finding("a100_speedup_7b", "A100 vs V100 throughput (tokens/s), 7B", 2.0, 2.0, "x", hardware="1 A100 vs 1 V100"),
    Finding("a100_speedup_13b", "A100 vs V100 throughput (tokens/s), 13B", 1.25, 1.25, "x",
            hardware="1 A100 vs 2 V100"),
    Finding("watts_8_to_32", "energy per second, 65B on 32 vs 8 V100s (increase)", 300.0, 1000.0, "W",
            hardware=HARDWARE["v100"]),
    Finding("j_per_token_65b_512", "energy per output token, 65B, max length 512", 3.0, 4.0, "J/token",
            hardware=HARDWARE["v100"]),
    Finding("cap175_time", "power cap 250 -> 175 W: run time change (mean over lengths)", 6.7, 6.7, "%",
            hardware="4 x " + HARDWARE["a100"]),
    Finding("cap175_energy", "power cap 250 -> 175 W: energy change (mean over lengths)", -23.0, -23.0, "%",
            hardware="4 x " + HARDWARE["a100"]),
    Finding("cap150_time", "power cap 250 -> 150 W: run time change (mean over lengths)", 19.5, 19.5, "%",
            hardware="4 x " + HARDWARE["a100"]),
    Finding("memory_util", "max GPU memory utilization (Tables IV/V)", 20.0, 25.0, "%",
            hardware="A100 and V100 (Tables IV/V)"),
)

# McDonald et al. 2022 (same group; inference, power caps vs 250 W): % change in time and energy.
RELATED_SOURCE = "McDonald et al. 2022"
RELATED_CAPS: dict[float, dict[str, float]] = {
    200.0: {"time": 8.2, "energy": -12.0},
    150.0: {"time": 22.7, "energy": -24.2},
    100.0: {"time": 114.0, "energy": -11.0},
}
RELATED_HARDWARE = "not stated in Samsi et al. 2023"
