"""Soak runs of the perception node (:mod:`orcnn_ros.soak`), run from a checkout.

    source .venv/bin/activate && source install/setup.bash
    python -P scripts/soak.py node [--frames 10000] [--rate 30] [--malformed 0.1] ...

The same as ``python -P -m orcnn_ros.soak``, except that the report and the nodes' logs go
to this checkout's ``outputs/soak_node`` unless ``--out`` says otherwise.
"""

import sys
from pathlib import Path

from orcnn_ros.soak import main

if __name__ == "__main__":
    sys.exit(main(default_out=Path(__file__).resolve().parents[1] / "outputs" / "soak_node"))
