"""The paper's experiment end to end: scarce real data -> generators -> classifier arms -> report.

  results = experiment.run(get_config("demo"), "/tmp/exp")   # configs/experiment.py

Modules, by responsibility:
  design      arms, every sub-run's config, their order, validation (nothing runs)
  stages      real data, the judge, generators (trained or shipped), synthetic sets
  utility     synthetic quality and usefulness: class fidelity, gate, FD matrix, CAS
  evaluation  per-arm test metrics, seed-level comparisons, headroom, anomaly results
  checks      results.json's schema and invariants
  report      warnings, verdict sentences and tables (Markdown)
  figures     figures/*.png
  runner      `run`: the four stages, resumable, preemptible
  launchers   where sub-runs run: inline, or as submitit jobs (SLURM / local) with a job table

The statistics themselves live in `cxrjax.metrics.significance` (paired t, Holm, hierarchical
bootstrap) and `cxrjax.metrics.utility` (class fidelity, gate, distance matrix), importable and
testable without running anything.
"""

from cxrjax.experiment.checks import check_results
from cxrjax.experiment.design import (
    ARM_LABELS,
    ARMS,
    GENERATORS,
    METRICS,
    STAGES,
    classifier_config,
    comparisons,
    generator_config,
    judge_config,
    plan,
    validate,
)
from cxrjax.experiment.evaluation import headline, scarce_class_metrics, target_scores
from cxrjax.experiment.runner import Preempted, run

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "GENERATORS",
    "METRICS",
    "STAGES",
    "Preempted",
    "check_results",
    "classifier_config",
    "comparisons",
    "generator_config",
    "headline",
    "judge_config",
    "plan",
    "run",
    "scarce_class_metrics",
    "target_scores",
    "validate",
]
