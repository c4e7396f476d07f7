"""Microbenchmarks (pytest-benchmark), kept out of the normal test run:

python -m pytest benchmarks/ --benchmark-only
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
