r"""Does a more diverse subset of a generator's images make its arm more useful? (issue #13)

  python -m benchmarks.diverse_selection --workdir=workdirs/demo --kind=pggan

For a finished experiment workdir: draw `pool_factor` x the arm's synthetic count of the scarce
class from the run's generator, embed them with the run's judge, and pick the arm's count two
ways: the first ones drawn (what the experiment does) and a k-center greedy cover of the pool
(each pick the image farthest from those already picked, in standardised judge features). Each
set then trains the arm's own classifier config for every seed of the run; the decision reads
validation ROC-AUC only, beside the run's own arms. (The trainer also scores the test split;
this script neither prints nor stores it.) About 8 minutes for the demo on 2 CPU cores.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import ml_collections
import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiment workdir", required=True)
_KIND = flags.DEFINE_string("kind", "pggan", "the generator whose arm to vary")
_POOL_FACTOR = flags.DEFINE_integer("pool_factor", 4, "pool size / the arm's synthetic count")
_SEED = flags.DEFINE_integer("seed", 777, "synthesis seed of the pool (not the run's)")
_OUT = flags.DEFINE_string("out", "/tmp/diverse_selection", "scratch folder")
_JSON_OUT = flags.DEFINE_string("json_out", None, "write the validation AUCs here")


def k_center(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center: start at a random point, then always add the farthest from the set."""
    chosen = [int(np.random.default_rng(seed).integers(len(features)))]
    distance = np.linalg.norm(features - features[chosen[0]], axis=1)
    for _ in range(k - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(features - features[chosen[-1]], axis=1))
    return np.asarray(chosen)


def _val_auc(result) -> float:
    auc = result["val"]["auc"]
    return float(auc["value"] if isinstance(auc, dict) else auc)


def main(argv):
    del argv
    from cxrjax import features, synthesis
    from cxrjax.data import imageio
    from cxrjax.train import classifier_run

    logging.set_verbosity(logging.WARNING)
    workdir, kind, out = _WORKDIR.value, _KIND.value, _OUT.value
    results = json.load(open(os.path.join(workdir, "results.json")))
    seeds = range(int(results["config"]["seeds"]))
    count = int(results["synthetic"]["count"])
    scarce = results["config"]["scarcity"]["class_name"]
    class_names = list(results["dataset"]["class_names"])
    pool_dir = os.path.join(out, "pool")
    if not os.path.exists(os.path.join(pool_dir, "provenance.json")):
        synthesis.synthesize(
            kind,
            os.path.join(workdir, kind),
            num_images=_POOL_FACTOR.value * count,
            output=pool_dir,
            label=scarce,
            seed=_SEED.value,
        )
    paths = sorted(glob.glob(os.path.join(pool_dir, scarce, "*.png")))
    images = np.stack([imageio.decode_gray(open(p, "rb").read(), p) for p in paths])
    judge = os.path.join(workdir, "judge")
    step = int(json.load(open(os.path.join(judge, "results.json")))["selected_step"])
    feats = features.extract(features.cxr_extractor(judge, step=step), images, batch_size=256)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    subsets = {"first drawn": np.arange(count), "k-center": k_center(feats, count)}

    table = {}
    for name, index in subsets.items():
        folder = os.path.join(out, name.replace(" ", "_"))
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, scarce))
        for j, i in enumerate(index):
            shutil.copyfile(paths[i], os.path.join(folder, scarce, f"{j:05d}.png"))
        provenance = {"class_names": class_names, "counts": {scarce: int(len(index))}}
        json.dump(provenance, open(os.path.join(folder, "provenance.json"), "w"))
        sub = feats[index]
        spread = float(np.mean(np.linalg.norm(sub[:, None] - sub[None], axis=-1)))
        aucs = []
        for seed in seeds:
            arm_dir = os.path.join(workdir, "arms", kind, f"seed{seed}")
            config = ml_collections.ConfigDict(
                json.load(open(os.path.join(arm_dir, "config.json")))
            )
            config.data.synthetic.manual_dir = folder
            config.data.synthetic.data_dir = os.path.join(out, "datasets")
            run_dir = os.path.join(out, "runs", f"{name.replace(' ', '_')}_seed{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            aucs.append(_val_auc(classifier_run.train_and_evaluate(config, run_dir)))
        table[f"{kind}, {name}"] = {"val_auc": aucs, "mean_pairwise_distance": spread}
    for arm in ("real_scarce", "oversampled", kind, "ddpm"):
        if arm in results["arms"]:
            table[f"run's arm {arm}"] = {
                "val_auc": [e["val"]["auc"] for e in results["arms"][arm]["per_seed"]]
            }
    print("| set | validation ROC-AUC (mean ± sd over seeds) | mean pairwise distance |")
    print("| --- | --- | --- |")
    for name, row in table.items():
        v = np.asarray([x["value"] if isinstance(x, dict) else x for x in row["val_auc"]])
        spread = row.get("mean_pairwise_distance")
        spread_text = "" if spread is None else f"{spread:.2f}"
        print(f"| {name} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | {spread_text} |")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(table, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
