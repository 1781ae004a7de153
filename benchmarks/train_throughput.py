"""Training throughput, nmm vs Hugging Face Llama: `nmm.bench.train` (also `nmm bench train`).

    python benchmarks/train_throughput.py --compile --json-out bench.json
"""

from nmm.bench.train import *  # noqa: F401,F403  (the benchmark's functions, for scripts and tests)
from nmm.bench.train import main

if __name__ == "__main__":
    main()
