"""How close can *any* weighting of the battery's statistics come to "never worse than its parts"?

    python benchmarks/anomaly_oracle.py            # after benchmarks/anomaly.py (its per-image statistics)
    python benchmarks/anomaly_oracle.py --quick    # after anomaly.py --quick

Issue 14 asks for one score whose AUROC is within 0.002 of the best single statistic on every case
of the anomaly battery. ``anomaly.py`` chooses a rule on the development half; this script asks the
question with hindsight instead, to tell a weak rule from an impossible target: over every case of
the last battery run (both halves, the real-image cases too when they ran), it searches the
weights of three rule families for the best worst-case gap, weights chosen while looking at every
result (so an upper bound on what a frozen rule of that family can do, not a score to ship):

  fisher   -sum_i w_i log p_i           (weighted Fisher / Good 1955)
  hmp      log sum_i w_i / p_i          (weighted harmonic-mean p-value, Wilson 2019)
  minp     max_i -w_i log p_i           (weighted minimum p-value)

over the one-sided tail probabilities of -ELBO bits, complexity, the KDE and the kNN density
(``p_i`` from each case's checkpoint reference, as the ``typicality`` score computes them),
weights on a simplex grid (step ``--step``). The per-image statistics are those ``anomaly.py``
saved under .bench/anomaly/stats/ (one .npz per case, normal and anomalous images).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import anomaly  # noqa: E402
from ood_metrics import auroc  # noqa: E402

USES = ("nll_bits", "complexity", "kde", "knn")
FAMILIES = ("fisher", "hmp", "minp")


QUICK = False  # --quick: the smoke battery's models and statistics (anomaly.py --quick)


def checkpoint_of(case: str) -> Path:
    """The checkpoint whose reference scored ``case`` in anomaly.py."""
    b, tag, n = (anomaly.BENCH, "quick", 1000) if QUICK else (anomaly.BENCH, "full", 30000)
    if case.startswith("elpv"):
        return b / "elpv64-battery.safetensors"
    if case.startswith("photo"):
        return b / "photo32-battery.safetensors"
    if case == "shift-mnist-fashion":
        return b / f"mnist-{tag}-{n}.safetensors"
    if case.startswith("holdout"):
        return b / f"fashion-no{case.split('-')[1]}-{tag}-{n}.safetensors"
    return b / f"fashion-{tag}-{n}.safetensors"  # Fashion->MNIST and the corruptions


@functools.lru_cache(maxsize=None)
def reference(ckpt: Path):
    """A checkpoint's typicality reference, read once (many cases share a model)."""
    from vae_model.checkpoint_header import inspect_checkpoint
    from vae_model.typicality import TypicalityReference

    return TypicalityReference.from_dict(inspect_checkpoint(str(ckpt)).meta["typicality"])


def log_pvalues(case: str, uses: tuple[str, ...] = USES) -> tuple[np.ndarray, np.ndarray]:
    """(normal, anomalous) (n, len(uses)) log p-values of ``case``'s images under its checkpoint's
    reference (a ``_2s`` name: its base statistic's two-sided p-value)."""
    from vae_model.losses import LN2

    z = np.load(anomaly.stats_file(case))
    ref = reference(checkpoint_of(case))

    def side(s: str) -> np.ndarray:
        st = {"nll_bits": z[f"{s}_elbo"] / LN2, **{k: z[f"{s}_{k}"] for k in ("complexity", "kde", "knn", "knn10")
                                                  if f"{s}_{k}" in z}}
        return ref.stat_log_pvalues(st, uses)

    return side("normal"), side("anomalous")


def rule(lp: np.ndarray, w: np.ndarray, family: str) -> np.ndarray:
    if family == "fisher":
        return -(lp * w).sum(1)
    if family == "minp":
        return (-lp * w).max(1)
    with np.errstate(divide="ignore"):
        return np.logaddexp.reduce(-lp + np.log(w), axis=1)  # log sum w_i / p_i; w_i = 0 drops the statistic


def simplex(k: int, step: float) -> np.ndarray:
    m = round(1 / step)
    return np.array([c for c in itertools.product(range(m + 1), repeat=k) if sum(c) == m], dtype=np.float64) / m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=None, help="the battery's results (default its last run's)")
    ap.add_argument("--quick", action="store_true", help="on the smoke battery (anomaly.py --quick), step 0.5")
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--uses", default=",".join(USES), help="statistics (names of vae_model.typicality.STATISTICS)")
    ap.add_argument("--skip", default=None, metavar="PREFIX", help="leave out the cases whose name starts so")
    ap.add_argument("--fit-half", choices=("all", "dev"), default="all",
                    help="choose the weights on every case (the hindsight bound) or on the development half only "
                         "(a frozen design choice, then judged on the held-out half)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/anomaly-oracle[-quick].json")
    args = ap.parse_args()
    if args.quick:
        global QUICK
        QUICK, anomaly.STATS, args.step = True, anomaly.BENCH / "stats-quick", 0.5
    results = args.results or str(ROOT / "benchmarks" / "results" / f"anomaly-battery{'-quick' if args.quick else ''}.json")
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"anomaly-oracle{'-quick' if args.quick else ''}.json")
    uses = tuple(args.uses.split(","))
    res = json.loads(Path(results).read_text())
    cases = {k: v for k, v in res["cases"].items()
             if anomaly.stats_file(k).exists() and not (args.skip and k.startswith(args.skip))}
    singles = {k: max(v["scores"][s]["auroc"] for s in anomaly._singles(v["scores"])) for k, v in cases.items()}
    lps = {k: log_pvalues(k, uses) for k in cases}
    grid = simplex(len(uses), args.step)
    names = list(lps)
    fit = np.array([args.fit_half == "all" or cases[k]["half"] == "dev" for k in names])
    halves = {h: np.array([cases[k]["half"] == h for k in names]) for h in ("dev", "held")}
    out: dict = {"uses": uses, "step": args.step, "cases": len(cases), "weightings": len(grid),
                 "fit_half": args.fit_half, "families": {}}
    for fam in FAMILIES:
        best = None
        for w in grid:
            gaps = np.array([auroc(rule(a, w, fam), rule(b, w, fam)) - singles[k] for k, (a, b) in lps.items()])
            key = (round(gaps[fit].min(), 4), gaps[fit].mean())
            if best is None or key > best[0]:
                best = (key, w, gaps)
        (worst, mean), w, gaps = best
        rec = {"weights": dict(zip(uses, w.tolist())), "worst_gap": worst, "mean_gap": mean,
               "within_0.002": int((gaps[fit] >= -0.002).sum()), "worst_case": names[int(np.where(fit, gaps, 1).argmin())],
               "gaps": dict(zip(names, np.round(gaps, 4).tolist()))}
        for h, m in halves.items():
            if m.any():
                rec[h] = {"worst": float(gaps[m].min()), "mean": float(gaps[m].mean()),
                          "within_0.002": f"{int((gaps[m] >= -0.002).sum())}/{int(m.sum())}"}
        out["families"][fam] = rec
        print(f"{fam}: weights {dict(zip(uses, w.round(2).tolist()))} (fitted on {args.fit_half}) worst gap "
              f"{worst:+.4f} ({rec['worst_case']}), mean {mean:+.4f}; " +
              "; ".join(f"{h} worst {rec[h]['worst']:+.4f} mean {rec[h]['mean']:+.4f} within {rec[h]['within_0.002']}"
                        for h in halves if h in rec), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
