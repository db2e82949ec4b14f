#!/usr/bin/env python3
"""Kill-and-resume soak of ``orcnn-core train`` (:mod:`orcnn_core.soak_training`).

    python scripts/soak_training.py --kills 50 --json soak_training.json
    python scripts/soak_training.py --kills 8 --iterations 20     # a short version
"""

import sys

from orcnn_core.soak_training import main

if __name__ == "__main__":
    sys.exit(main())
