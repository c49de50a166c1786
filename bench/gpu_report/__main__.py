"""``python -m bench.gpu_report``: see :mod:`bench.gpu_report`."""
import sys

from bench.gpu_report.runner import main

sys.exit(main())
