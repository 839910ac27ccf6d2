r"""Where an experiment's minutes go, before vs after: two finished workdirs' profiles side by side.

  python -m benchmarks.demo_profile --before=workdirs/demo_before --after=workdirs/demo \
      --json_out=benchmarks/results/demo_profile_cpu.json

Reads each workdir's results.json "profile" (written by the experiment: per stage, its
sections with JAX's tracing and compiles apart; the sums of the sub-runs' own profiles) and
prints two Markdown tables: stages (wall seconds, before / after / ratio) and, summed over all
stages, where the time went by category. Both runs should share one config and one machine.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

_BEFORE = flags.DEFINE_string(
    "before", None, "Finished experiment workdir (before).", required=True
)
_AFTER = flags.DEFINE_string("after", None, "Finished experiment workdir (after).", required=True)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write both profiles and the tables here.")

# Sub-run categories (results.json profile of each sub-run) and the experiment's own sections.
SUB_RUN = ("setup", "trace", "compile", "checkpoint", "data", "eval", "finish", "steps")


def load(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    if "profile" not in results:
        raise SystemExit(f"{workdir}/results.json has no profile (a run from before profiles)")
    profile = results["profile"]
    if not profile.get("shipped_excluded"):
        # Runs from before that fix summed an installed shipped generator's own results.json
        # profile (its training, made elsewhere) into stage 2's sub-runs: take it out.
        sums = profile["sub_runs"].get("generators_and_synthesis", {})
        for entry in results.get("generators", {}).values():
            path = os.path.join(workdir, entry["workdir"], "results.json")
            if entry.get("source") != "shipped" or not os.path.exists(path):
                continue
            with open(path) as f:
                own = json.load(f).get("profile") or {}
            if own and sums:
                sums["count"] -= 1
                for key, seconds in own.items():
                    sums[key] = round(sums.get(key, 0.0) - seconds, 2)
    return results


def categories(results: dict) -> dict[str, float]:
    """Seconds by category over the whole run: the sub-runs' own categories, then what the
    experiment did outside sub-runs (its sections; its trace/compile outside sub-runs)."""
    profile = results["profile"]
    out: dict[str, float] = {}
    sub_trace = sub_compile = 0.0
    for sums in profile["sub_runs"].values():
        for key in SUB_RUN:
            out[f"sub-runs: {key}"] = out.get(f"sub-runs: {key}", 0.0) + sums.get(key, 0.0)
        sub_trace += sums.get("trace", 0.0)
        sub_compile += sums.get("compile", 0.0)
    # The experiment's timer counts every trace / compile (the sub-runs' too) in its own
    # "trace" / "compile" and the rest of the sub-runs in "sub-runs".
    exp_trace = sum(row.get("trace", 0.0) for row in profile["stages"].values())
    exp_compile = sum(row.get("compile", 0.0) for row in profile["stages"].values())
    sections: dict[str, float] = {}
    for row in profile["stages"].values():
        for key, seconds in row.items():
            if key not in ("sub-runs", "trace", "compile", "total"):
                sections[key] = sections.get(key, 0.0) + seconds
    out["trace outside sub-runs"] = exp_trace - sub_trace
    out["compile outside sub-runs"] = exp_compile - sub_compile
    for key, seconds in sections.items():
        out[key if key != "rest" else "other (experiment's own)"] = seconds
    sub_total = sum(sums.get("total", 0.0) for sums in profile["sub_runs"].values())
    exp_subruns = sum(row.get("sub-runs", 0.0) for row in profile["stages"].values())
    out["sub-run overhead (outside their own profile)"] = (
        exp_subruns + sub_trace + sub_compile - sub_total
    )
    return {k: round(v, 1) for k, v in out.items()}


def table(rows: list[tuple[str, float | None, float | None]], unit: str = "s") -> list[str]:
    lines = [
        f"| | before ({unit}) | after ({unit}) | after / before |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, before, after in rows:
        ratio = f"{after / before:.2f}" if before and after is not None else ""
        lines.append(f"| {name} | {before if before is not None else ''} | "
                     f"{after if after is not None else ''} | {ratio} |")  # fmt: skip
    return lines


def main(argv):
    del argv
    before, after = load(_BEFORE.value), load(_AFTER.value)
    stages = list(before["wall_time_s"])
    stage_rows = [
        (stage, before["wall_time_s"].get(stage), after["wall_time_s"].get(stage))
        for stage in stages
        if stage != "invocations"
    ]
    cat_before, cat_after = categories(before), categories(after)
    names = list(dict.fromkeys([*cat_before, *cat_after]))
    cat_rows = [(name, cat_before.get(name), cat_after.get(name)) for name in names]
    lines = ["Stages (wall seconds):", "", *table(stage_rows), "",
             "Where the time went (seconds, all stages):", "", *table(cat_rows)]  # fmt: skip
    print("\n".join(lines))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(
                {
                    "before": {"workdir": _BEFORE.value, "wall_time_s": before["wall_time_s"],
                               "profile": before["profile"], "categories": cat_before},
                    "after": {"workdir": _AFTER.value, "wall_time_s": after["wall_time_s"],
                              "profile": after["profile"], "categories": cat_after},
                    "software": after.get("software"),
                    "device": after.get("device"),
                },
                f,
                indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
