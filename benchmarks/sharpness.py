r"""Fine detail of synthetic vs real images of the scarce class: a cue the judge does not see.

  python -m benchmarks.sharpness --workdir=workdirs/demo

For a finished experiment workdir: the mean absolute discrete Laplacian (4-neighbour, images in
[0, 1] at the classifier's resolution) of the scarce class's real training and validation
images and of every synthetic set in WORKDIR/synthetic, with its per-image spread, the mean
intensity and the per-pixel spread across images (diversity). A classifier trained on synthetic
images that are smoother than real ones can learn "smooth = scarce class", which a class-
fidelity judge (it only asks which class an image looks like) does not penalise.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags

from cxrjax.metrics import utility

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiment workdir", required=True)
_PRESET = flags.DEFINE_string("preset", "demo", "the experiment preset the workdir ran")


def describe(images: np.ndarray) -> dict[str, float]:
    energy = utility.laplacian_energy(images)
    return {
        "n": int(len(images)),
        "laplacian_mean": round(float(energy.mean()), 4),
        "laplacian_std": round(float(energy.std()), 4),
        "intensity_mean": round(float(images.mean()), 3),
        "pixel_std_across_images": round(float(images.std(axis=0).mean()), 3),
    }


def main(argv):
    del argv
    import configs.experiment as experiment_configs
    from cxrjax import fileio
    from cxrjax.data import imageio
    from cxrjax.experiment import stages

    workdir = os.path.abspath(_WORKDIR.value)
    config = experiment_configs.get_config(_PRESET.value)
    data = stages.prepare_data(config, workdir)
    res = int(config.data.resolution)
    scarce = config.scarcity.class_name
    c = data["info"]["class_names"].index(scarce)
    labels, kept = data["labels"]["train"], data["kept"]
    rows = {
        f"real {scarce}, scarce training split": stages.decode(
            data["splits"]["train"], kept[labels[kept] == c], res
        ),
        f"real {scarce}, validation": stages.decode(
            data["splits"]["val"], np.nonzero(data["labels"]["val"] == c)[0], res
        ),
    }
    for folder in sorted(glob.glob(os.path.join(workdir, "synthetic", "*", scarce))):
        paths = sorted(glob.glob(os.path.join(folder, "*.png")))
        if not paths:
            continue
        images = []
        for path in paths:
            with open(path, "rb") as f:
                image = imageio.decode_gray(f.read(), path)
            images.append(image if image.shape[0] == res else imageio.resize_square(image, res))
        rows[f"synthetic {os.path.basename(os.path.dirname(folder))}"] = np.stack(images)
    out = {name: describe(np.asarray(x, np.float32) / 255.0) for name, x in rows.items()}
    fileio.write_json(os.path.join(workdir, "sharpness.json"), out)
    print("| images | n | Laplacian energy (mean ± sd) | intensity | pixel sd across images |")
    print("| --- | --- | --- | --- | --- |")
    for name, d in out.items():
        print(
            f"| {name} | {d['n']} | {d['laplacian_mean']} ± {d['laplacian_std']} | "
            f"{d['intensity_mean']} | {d['pixel_std_across_images']} |"
        )


if __name__ == "__main__":
    app.run(main)
