#!/bin/bash

# Parameters
#SBATCH --constraint=xeon-g6
#SBATCH --cpus-per-task=20
#SBATCH --error=/sweep/submitit/%j/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gres=gpu:volta:2
#SBATCH --job-name=w2w-llama_65b-v100-x16
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=/sweep/submitit/%j/%j_0_log.out
#SBATCH --partition=xeon-g6-volta
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module load anaconda/2023a
export NCCL_SOCKET_IFNAME=^docker,lo

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /sweep/submitit/%j/%j_%t_log.out --error /sweep/submitit/%j/%j_%t_log.err python -u -m submitit.core._submit /sweep/submitit/%j
