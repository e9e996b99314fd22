"""A sweep's pool worker: ``python -m gatelab.study.worker STUDY_DIR THREADS PARENT_PID [IMPORTS...]``.

It claims and runs the study's pending trials until none is left (:func:`.runner.worker_loop`) and
dies with the sweep that started it. Not imported by :mod:`gatelab.study`.
"""

import sys

from .runner import _worker_main

if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
