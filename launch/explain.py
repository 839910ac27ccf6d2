r"""Where a trained classifier looks: CAM / Grad-CAM heatmaps over films of one split.

  python -m launch.explain --workdir=/tmp/cls --split=val --num_images=8 [--method=both|cam|gradcam]
      [--indices=0,5,9] [--class_name=pneumonia] [--step=N] [--output_dir=DIR]

Writes DIR/<split>_<method>.png (one row per film: film, heatmap, overlay, titled with the
predicted probability) and one PNG per film; DIR defaults to WORKDIR/explain. The explained
class is --class_name, else class 1 of a binary model, else the most probable class/finding.
"""

from __future__ import annotations

from absl import flags

from cxrjax import explain
from launch import common

WORKDIR = flags.DEFINE_string("workdir", None, "A train_classifier workdir.", required=True)
SPLIT = flags.DEFINE_string("split", "val", "Split whose films to explain (train, val, test).")
NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "The first N films (unless --indices).")
INDICES = flags.DEFINE_list("indices", None, "Record indices of the split to explain.")
METHOD = flags.DEFINE_enum("method", "both", [*explain.METHODS, "both"], "Heatmap method.")
CLASS_NAME = flags.DEFINE_string("class_name", None, "Class / finding to explain.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by val AUC, else last).")
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory (default WORKDIR/explain).")


def job():
    indices = [int(i) for i in INDICES.value] if INDICES.value else None
    methods = explain.METHODS if METHOD.value == "both" else (METHOD.value,)
    paths = []
    for method in methods:
        paths += explain.overlays(
            WORKDIR.value,
            SPLIT.value,
            indices,
            num_images=NUM_IMAGES.value,
            method=method,
            class_name=CLASS_NAME.value,
            output_dir=OUTPUT_DIR.value,
            step=STEP.value,
        )
    return {"figures": paths}


def main(argv):
    del argv
    common.setup()
    common.run_job(job, lambda results: {"figures": results["figures"]})


if __name__ == "__main__":
    common.main_entry(main)
