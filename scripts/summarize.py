"""Summarise a sweep: ``python scripts/summarize.py SWEEP_DIR [--plot]`` (see lifelong.metrics.summary)."""

import sys

from lifelong.metrics.summary import main

if __name__ == "__main__":
    sys.exit(main())
