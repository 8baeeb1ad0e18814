"""Optimizer step-time benchmark: fusedopt against torch.optim's for-loop, foreach,
fused (and on CUDA torch.compile'd) steps. A thin wrapper over `python -m
fusedopt.bench`, which takes the same arguments (see --help):

    python benchmarks/step_time.py --quick
    python benchmarks/step_time.py --models gpt2-small,bert-base --algos adamw --out bench-out
"""
import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmarks/step_time.py"))
