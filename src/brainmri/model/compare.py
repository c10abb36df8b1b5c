"""`brainmri compare A B`: is run B better than run A on the same test images?

A and B are DVC revisions or experiment names (their `reports/predictions.csv`
is read from DVC's cache or remote), `workspace`, MLflow run ids of an evaluate stage (its logged
`evaluate/predictions.csv`), or predictions CSV files. The difference of each
headline metric gets a paired bootstrap interval, and McNemar's exact test on
the images one run gets right and the other wrong gives the verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from brainmri.core import stats
from brainmri.core.errors import DataError
from brainmri.core.paths import PREDICTIONS

MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
SIGNIFICANCE = 0.05


def load_predictions(ref: str) -> pd.DataFrame:
    """The predictions table (path, actual, predicted, ...) that `ref` names."""
    if ref == "workspace":  # as `dvc exp show` names it: the outputs in the working tree
        if not PREDICTIONS.is_file():
            raise DataError(f"workspace: no {PREDICTIONS}; run dvc repro first")
        return pd.read_csv(PREDICTIONS)
    if Path(ref).is_file():
        return pd.read_csv(ref)
    if MLFLOW_RUN_ID.fullmatch(ref):
        import mlflow

        from brainmri.core.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=f"evaluate/{PREDICTIONS.name}")
        except Exception as error:  # MLflow raises several types for an unknown run or artifact
            raise DataError(f"'{ref}': no evaluate/{PREDICTIONS.name} in that MLflow run ({error})") from None
        return pd.read_csv(local)
    import dvc.api
    from dvc.scm import RevError

    try:
        with dvc.api.open(PREDICTIONS.as_posix(), rev=ref) as handle:
            return pd.read_csv(handle)
    except RevError:
        raise DataError(
            f"'{ref}' is not a predictions file, an MLflow run id, or a git revision or DVC experiment"
        ) from None
    except Exception as error:  # DVC raises several types for an output it cannot find
        raise DataError(
            f"'{ref}': its {PREDICTIONS} is in neither this DVC cache nor a reachable DVC remote "
            f"({type(error).__name__}). Fetch it with `dvc pull` or `dvc exp pull origin {ref}` "
            f"from the project's remote, or rebuild it: `git checkout {ref} && dvc repro evaluate`"
        ) from None


@dataclass(frozen=True)
class Comparison:
    images: int
    metrics: dict[str, tuple[float, float, float, float, float]]  # A, B, B - A, interval low, high
    a_only_right: int
    b_only_right: int
    p_value: float

    @property
    def verdict(self) -> str:
        if self.p_value >= SIGNIFICANCE:
            return f"B is indistinguishable from A at the {SIGNIFICANCE:.0%} level (McNemar p = {self.p_value:.3g})"
        better = "better" if self.b_only_right > self.a_only_right else "worse"
        return f"B is {better} than A at the {SIGNIFICANCE:.0%} level (McNemar p = {self.p_value:.3g})"


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, seed: int = 0) -> Comparison:
    """Paired comparison of two predictions tables of the same test images."""
    only_a, only_b = set(a["path"]) - set(b["path"]), set(b["path"]) - set(a["path"])
    if only_a or only_b:
        raise DataError(
            f"A and B were scored on different test images ({len(only_a)} only in A, {len(only_b)} only in B): "
            "compare runs of the same data and split"
        )
    merged = a[["path", "actual", "predicted"]].merge(
        b[["path", "actual", "predicted"]], on="path", suffixes=("_a", "_b")
    )
    if (merged["actual_a"] != merged["actual_b"]).any():
        raise DataError("A and B give the same images different true labels: compare runs of the same data")
    classes = sorted(set(merged["actual_a"]) | set(merged["predicted_a"]) | set(merged["predicted_b"]))
    code = {name: i for i, name in enumerate(classes)}
    y_true = merged["actual_a"].map(code).to_numpy()
    pred_a, pred_b = merged["predicted_a"].map(code).to_numpy(), merged["predicted_b"].map(code).to_numpy()
    metrics = {}
    for name, statistic in stats.HEADLINE_METRICS.items():
        metric = partial(statistic, num_classes=len(classes))
        difference, low, high = stats.paired_bootstrap_difference(y_true, pred_a, pred_b, metric, seed=seed)
        metrics[name] = (metric(y_true, pred_a), metric(y_true, pred_b), difference, low, high)
    a_right, b_right, p_value = stats.mcnemar_exact(pred_a == y_true, pred_b == y_true)
    return Comparison(len(merged), metrics, a_right, b_right, p_value)


def report(comparison: Comparison, a: str, b: str, markdown: bool = False) -> str:
    rows = [
        (name, f"{va:.4f}", f"{vb:.4f}", f"{diff:+.4f}", f"[{low:+.4f}, {high:+.4f}]")
        for name, (va, vb, diff, low, high) in comparison.metrics.items()
    ]
    header = ("metric", "A", "B", "B - A", "95% interval (paired bootstrap)")
    mcnemar = (
        f"McNemar's exact test on the images only one run gets right: A {comparison.a_only_right}, "
        f"B {comparison.b_only_right}"
    )
    if markdown:
        lines = [f"**A** `{a}` vs **B** `{b}`, {comparison.images} test images", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([*lines, "", mcnemar + ".", "", f"**{comparison.verdict}**"]) + "\n"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([f"A: {a}\nB: {b}\n{comparison.images} test images", *table, mcnemar, comparison.verdict]) + "\n"


def compare_refs(a: str, b: str, markdown: bool = False) -> str:
    return report(compare_predictions(load_predictions(a), load_predictions(b)), a, b, markdown)
