r"""Exports a finished PGGAN / DDPM run as a small loadable generator (no optimizer state).

  python -m launch.export_generator --generator=pggan --workdir=/tmp/pggan_scarce \
      --output=cxrjax/resources/generators/pneumonia_mnist_scarce_pggan

Writes OUTPUT/config.json, results.json and generator.npz (the EMA weights, plus the PGGAN
discriminator that f-AnoGAN scores with). `launch.synthesize`, `cxrjax.anomaly` and the
experiment (`--config.generators=shipped`) read OUTPUT like the run itself. This is how the
generators shipped in cxrjax/resources/generators/ were made (see their PROVENANCE.md).
"""

from __future__ import annotations

import os

from absl import flags

from cxrjax import config as config_lib
from cxrjax import synthesis
from launch import common

GENERATOR = flags.DEFINE_enum("generator", None, list(synthesis.GENERATORS), "Generator kind.")
WORKDIR = flags.DEFINE_string("workdir", None, "The finished generator run.")
OUTPUT = flags.DEFINE_string("output", None, "Where to write the exported generator.")
flags.mark_flags_as_required(["generator", "workdir", "output"])


def main(argv):
    del argv
    common.setup()

    def validate():
        results = os.path.join(os.path.expanduser(WORKDIR.value), "results.json")
        if not os.path.exists(results):
            raise config_lib.ConfigError(
                f"--workdir={WORKDIR.value} holds no finished run ({results} missing)"
            )

    def job():
        path = synthesis.export_generator(GENERATOR.value, WORKDIR.value, OUTPUT.value)
        size = os.path.getsize(os.path.join(path, synthesis.EXPORT_FILE))
        return {"finished": True, "output": path, "bytes": size}

    common.run_job(job, lambda result: result, validate=validate)


if __name__ == "__main__":
    common.main_entry(main)
