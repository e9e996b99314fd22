"""Studies: sweeps over cells x activations x seeds (or any config keys), a results store, a report.

>>> study = gatelab.study.load_study("configs/studies/demo.toml")     # bases, axes, points, budget
>>> gatelab.study.sweep(study, "runs/demo-study")                     # a process pool; resumable
>>> gatelab.study.write_report("runs/demo-study")                     # report.html and report.md

``gatelab sweep STUDY.toml`` and ``gatelab report STUDY_DIR`` are the command-line twins. A study
directory holds ``study.toml`` (the study file as run), ``study.sqlite`` (the store,
:class:`Store`), ``trials/NAME/`` (one ordinary run directory per trial) and the report.
"""

from .report import write_report
from .runner import cores, plan_workers, run_trial, sweep, worker_loop
from .spec import Study, Trial, expand, load_study, study_from_dict, trial_key
from .store import FINISHED, STATUSES, STORE_NAME, Store

__all__ = [
    "Study", "Trial", "load_study", "study_from_dict", "expand", "trial_key",
    "Store", "STATUSES", "FINISHED", "STORE_NAME",
    "sweep", "run_trial", "worker_loop", "cores", "plan_workers",
    "write_report",
]
