"""Per-rank energy: NVML windows and sampler for the GPU, RAPL for the CPUs, power caps (import the modules)."""
