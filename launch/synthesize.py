r"""Synthesizes labeled images from a trained PGGAN or DDPM and prepares them as a dataset.

  python -m launch.synthesize --generator=ddpm --workdir=/tmp/ddpm --num_images=500 \
      --output=/tmp/synth_ddpm [--label=pneumonia] [--sampler=ddim --steps=50 --guidance=2] \
      [--seed=0] [--prepare_as=NAME]

Writes OUT/<class_name>/<generator>_s<seed>_<i>.png and OUT/provenance.json from the latest
checkpoint's EMA weights, then (unless --prepare_as="") builds OUT as the image_folder dataset
NAME (default: `<basename of OUT>-<hash of its absolute path>`, so runA/syn and runB/syn never
share a prepared dataset) at the generator's resolution, readable by the pipeline as
`image_folder/<NAME>_r<resolution>` (data.name=image_folder, data.manual_dir=OUT).
A non-empty OUT is refused unless --append (add; provenance.json describes every file) or
--overwrite (replace its images).
"""

from __future__ import annotations

import os

from absl import flags

from cxrjax import config as config_lib
from cxrjax import synthesis
from cxrjax.data import builders
from cxrjax.data.builders import image_folder
from launch import common

GENERATOR = flags.DEFINE_enum("generator", None, list(synthesis.GENERATORS), "Generator kind.")
WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the generator.")
NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images to write.")
OUTPUT = flags.DEFINE_string("output", None, "Output folder (class folders + provenance.json).")
LABEL = flags.DEFINE_string("label", None, "Class index or name (default: balanced).")
SAMPLER = flags.DEFINE_enum("sampler", "ddim", list(synthesis.SAMPLERS), "DDPM sampler.")
STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps (DDPM only).")
GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (DDPM; default: the run's).")
ETA = flags.DEFINE_float("eta", None, "DDIM eta (DDPM only; default: the run's sample.eta).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per sampling batch.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to build the dataset (default: usual).")
PREPARE_AS = flags.DEFINE_string(
    "prepare_as", None, 'image_folder dataset name (default: basename-pathhash; "" = skip).'
)
APPEND = flags.DEFINE_bool(
    "append", False, "Add to a non-empty --output (provenance.json then describes every file)."
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the images a non-empty --output holds.")
flags.mark_flags_as_required(["generator", "workdir", "num_images", "output"])


def mode() -> str:
    if APPEND.value and OVERWRITE.value:
        raise config_lib.ConfigError("--append and --overwrite exclude each other")
    return "append" if APPEND.value else "overwrite" if OVERWRITE.value else "new"


def validate():
    synthesis.check_request(
        GENERATOR.value,
        WORKDIR.value,
        num_images=NUM_IMAGES.value,
        output=OUTPUT.value,
        mode=mode(),
        batch_size=BATCH_SIZE.value,
    )


def job():
    provenance = synthesis.synthesize(
        GENERATOR.value,
        WORKDIR.value,
        num_images=NUM_IMAGES.value,
        output=OUTPUT.value,
        label=LABEL.value,
        seed=SEED.value,
        batch_size=BATCH_SIZE.value,
        sampler=SAMPLER.value,
        steps=STEPS.value,
        guidance=GUIDANCE.value,
        eta=ETA.value,
        mode=mode(),
    )
    output = os.path.abspath(os.path.expanduser(OUTPUT.value))
    name = PREPARE_AS.value
    if name is None:
        name = image_folder.path_name(output)
    result = {"output": output, **provenance}
    if name:
        builder = builders.prepare(
            "image_folder",
            data_dir=DATA_DIR.value,
            manual_dir=output,
            folder_name=name,
            resolution=provenance["resolution"],
            class_names=provenance["class_names"],
            overwrite=mode() != "new",  # the folder's images changed: rebuild its records
        )
        result["dataset"] = f"image_folder/{builder.info.config_name}"
        result["dataset_dir"] = str(builder.data_dir)
    return result


def main(argv):
    del argv
    common.setup()
    common.run_job(
        job,
        lambda r: {
            k: r.get(k)
            for k in ("output", "generator", "checkpoint_step", "counts", "dataset", "dataset_dir")
        },
        validate=validate,
    )


if __name__ == "__main__":
    common.main_entry(main)
