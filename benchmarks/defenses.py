"""The defence benchmark (issue 14): the same as ``fedkd bench defenses``; see fedkd/bench/defenses.py.

    python benchmarks/defenses.py                   # full grid: digits, MNIST, synthetic subjects; seeds 0 1 2
    python benchmarks/defenses.py --quick --seeds 0 # WEAKENED attacks, a smoke run
"""

import sys

from fedkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "defenses", *sys.argv[1:]]))
