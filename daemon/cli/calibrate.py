"""``chexd calibrate``: per-class thresholds fitted on one patient-disjoint half, reported on the other.

Two modes. With ``--predictions CSV --labels CSV`` it calibrates those scores and changes no model (a predictions
file has no model to attach thresholds to). Otherwise it runs a model (default: the active one) over a validation
source (phantom split, ChestX-ray14 folder, or DICOM folder + labels CSV), fits the thresholds and registers a new
*candidate* version carrying them; the active model is never changed (``chexd model activate`` does that).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import err, fail
from daemon.cli.console import out as stdout

if TYPE_CHECKING:
    from daemon.maintenance import MaintenanceError
    from model.calibrate import CalibrationResult
    from model.datasets import LabelledSource

Progress = Callable[[str, int, int], None]


@contextmanager
def progress_reporter(quiet: bool = False) -> Iterator[Progress]:
    """A (stage, done, total) callback: a rich progress bar on a terminal, plain ``stage: done/total`` lines on
    stderr otherwise (about every 10%), nothing when ``quiet``."""
    if quiet:
        yield lambda stage, done, total: None
        return
    if err.is_terminal:
        from daemon.cli.train import _progress, _reporter

        with _progress(quiet=False) as progress:
            yield _reporter(progress)
        return
    last: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 10):
            last[stage] = done
            err.print(f"{stage}: {done}/{total}", highlight=False, markup=False)

    yield report


def fail_with(exc: MaintenanceError) -> NoReturn:
    """A maintenance-layer error as the CLI's error exit: 2 when the options are wrong, else 1."""
    fail(str(exc), 2 if exc.usage else 1)


def validation_source(
    *,
    phantom: str | None,
    count: int,
    seed: int,
    chestxray14: Path | None,
    split: str,
    dicom_dir: Path | None,
    labels: Path | None,
    default_phantom: str,
) -> LabelledSource:
    """The labelled source the options name (at most one of --phantom, --chestxray14, --dicom-dir); exits 2 on a
    conflict, 1 on an unusable source (``daemon.maintenance.labelled_source``)."""
    from daemon.maintenance import MaintenanceError, SourceOptions, labelled_source

    try:
        return labelled_source(SourceOptions(phantom=phantom, count=count, seed=seed, chestxray14=chestxray14,
                                             split=split, dicom_dir=dicom_dir, labels=labels,
                                             default_phantom=default_phantom))
    except MaintenanceError as exc:
        fail_with(exc)


def _ci(values: list[float] | None) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "-"


def _print_table(data: dict[str, Any], title: str) -> None:
    # in a pipe or log rich assumes 80 columns and squeezes the table; there, use the width it needs
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=160)
    table = Table("finding", "threshold", "F1", "95% CI", "F1@0.5", "recall", "recall@0.5", "precision",
                  "precision@0.5", "positives fit/held-out", title=title)
    for c in data["findings"]:
        table.add_row(
            c["label"],
            f"{c['threshold']:.4f}" + ("" if c["fitted"] else "*"),
            f"{c['f1']:.3f}",
            _ci(c["f1_ci"]),
            f"{c['f1_default']:.3f}",
            f"{c['recall']:.3f}",
            f"{c['recall_default']:.3f}",
            f"{c['precision']:.3f}",
            f"{c['precision_default']:.3f}",
            f"{c['fit_positives']}/{c['report_positives']}",
        )
    console.print(table)
    if any(not c["fitted"] for c in data["findings"]):
        console.print("* not fitted (one outcome only in the fit half): threshold kept", highlight=False)

    def fmt(name: str) -> str:
        value = data[name]
        return "-" if value is None else f"{value:.3f} (95% CI {_ci(data[name + '_ci'])})"

    lines = [
        f"held-out half: {data['n_report']} images, fit half: {data['n_fit']} images"
        + (" (first split)" if data.get("n_splits", 1) > 1 else "") + f" ({data['note']})",
        f"{data.get('n_splits', 1)} patient-disjoint split(s) (seeds {data['seed']}-"
        f"{data['seed'] + data.get('n_splits', 1) - 1}); thresholds fitted on {data.get('thresholds_source', '')}",
        f"mean F1 {fmt('mean_f1')} vs {fmt('mean_f1_default')} at 0.5",
        f"mean recall {fmt('mean_recall')} vs {fmt('mean_recall_default')} at 0.5",
        f"mean precision {fmt('mean_precision')} vs {fmt('mean_precision_default')} at 0.5",
        f"F1 ratio {fmt('f1_ratio')}, recall ratio {fmt('recall_ratio')} ({data['objective']} thresholds / 0.5)",
    ]
    if data.get("dropped_rows"):
        lines.append(f"{data['dropped_rows']} prediction row(s) had no label row and were left out")
    lines.append(data["message"])
    for line in lines:
        console.print(line, highlight=False, markup=False)


def _emit(data: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_table(data, title)


def calibrate(
    objective: Annotated[str, typer.Option(help="Threshold rule: youden (max TPR-FPR) or f1 (max F1).")] = "youden",
    predictions: Annotated[
        Path | None,
        typer.Option(help="Predictions CSV (image id + 14 probabilities, 'prob_<Label>' or '<Label>' headers); "
                     "calibrates these scores and changes no model."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labels CSV for --predictions or --dicom-dir (NIH Data_Entry style or 0/1 columns)."),
    ] = None,
    phantom: Annotated[
        str | None, typer.Option(help="Phantom split to run the model on: train, val or test (default val).")
    ] = None,
    count: Annotated[int, typer.Option(min=10, help="Phantom images.")] = 300,
    chestxray14: Annotated[
        Path | None, typer.Option(help="ChestX-ray14 folder (images/, Data_Entry_2017*.csv, *_list.txt).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="ChestX-ray14 split: test (unseen by CheXNet-style models) or train_val.")
    ] = "test",
    dicom_dir: Annotated[Path | None, typer.Option(help="Folder of DICOM images labelled by --labels.")] = None,
    model: Annotated[Path | None, typer.Option(help="Artifact to calibrate (default: the active model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the halves and the bootstrap (and of the phantom).")] = 0,
    n_bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the CIs.")] = 200,
    splits: Annotated[
        int,
        typer.Option("--splits", min=1, help="Patient-disjoint fit/held-out splits (seeds seed..seed+N-1): figures "
                     "are their means and CIs pool their patient bootstraps, so they include split variability; "
                     "with N > 1 the thresholds written are fitted on all images."),
    ] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Fit and report; register no candidate.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Fit per-class thresholds on one patient-disjoint half and report F1/recall/precision on the other (patient
    bootstrap 95% CIs) against the 0.5 threshold, repeated over --splits patient-disjoint splits (CIs include the
    split variability). A model run writes a new candidate version; the active model is unchanged."""
    from model.calibrate import OBJECTIVES

    if objective not in OBJECTIVES:
        fail(f"Invalid --objective {objective!r} - expected one of {', '.join(OBJECTIVES)}", 2)
    if predictions is not None:
        if labels is None:
            fail("--predictions needs --labels CSV (e.g. Data_Entry_2017_v2020.csv.gz)", 2)
        given = [name for name, value in (("--phantom", phantom), ("--chestxray14", chestxray14),
                                          ("--dicom-dir", dicom_dir), ("--model", model)) if value is not None]
        if given:
            fail(f"--predictions calibrates a predictions file; {', '.join(given)} do(es) not apply", 2)
        _calibrate_predictions(predictions, labels, objective=objective, seed=seed, n_bootstrap=n_bootstrap,
                               n_splits=splits,
                               as_json=json_out)
        return
    source = validation_source(phantom=phantom, count=count, seed=seed, chestxray14=chestxray14, split=split,
                               dicom_dir=dicom_dir, labels=labels, default_phantom="val")
    _calibrate_model(source, model=model, objective=objective, seed=seed, n_bootstrap=n_bootstrap, n_splits=splits,
                     device=device,
                     batch_size=batch_size, dry_run=dry_run, as_json=json_out)


def _settings():  # type: ignore[no-untyped-def]
    from daemon.cli.context import settings

    return settings()


def _run(settings: Any, params: dict[str, Any], work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work(job)`` inside an admin-job record; map expected failures to a CLI error."""
    from daemon.maintenance import MaintenanceError, run_job

    try:
        return run_job(settings, "calibrate", params, work)
    except MaintenanceError as exc:
        fail_with(exc)


def _summary(result: CalibrationResult) -> dict[str, Any]:
    return {k: result.to_dict()[k] for k in ("objective", "f1_ratio", "recall_ratio", "mean_f1", "mean_f1_default",
                                             "mean_recall", "mean_recall_default", "n_fit", "n_report", "split",
                                             "n_splits")}


def _calibrate_predictions(predictions: Path, labels: Path, *, objective: str, seed: int, n_bootstrap: int,
                           n_splits: int,
                           as_json: bool) -> None:
    from model.calibrate import calibrate as fit
    from model.scores import read_scored_csv

    params = {"mode": "predictions", "predictions": str(predictions), "labels": str(labels), "objective": objective,
              "seed": seed, "n_bootstrap": n_bootstrap, "n_splits": n_splits}

    def work(job: Any) -> dict[str, Any]:
        scored = read_scored_csv(predictions, labels)
        result = fit(scored.scores, scored.labels, scored.patients, objective=objective,  # type: ignore[arg-type]
                     seed=seed, n_bootstrap=n_bootstrap, n_splits=n_splits)
        data = result.to_dict() | {
            "source": scored.source,
            "images": len(scored.ids),
            "dropped_rows": scored.dropped,
            "dropped_examples": list(scored.dropped_examples),
            "model": None,
            "candidate": None,
            "model_changed": False,
            "message": "no model was changed: a predictions CSV has no model to attach thresholds to - run "
            "'chexd calibrate' without --predictions to write a candidate version of a model",
        }
        job.result = _summary(result) | {"images": len(scored.ids), "dropped_rows": scored.dropped}
        return data

    data = _run(_settings(), params, work)
    _emit(data, as_json, f"{objective} thresholds on {data['source']}")


def _calibrate_model(source: LabelledSource, *, model: Path | None, objective: str, seed: int, n_bootstrap: int,
                     n_splits: int,
                     device: str, batch_size: int, dry_run: bool, as_json: bool) -> None:
    from daemon.maintenance import MaintenanceError, backbone_check, load_parent, write_candidate
    from model.calibrate import calibrate as fit
    from model.scores import score_source

    settings = _settings()
    try:
        parent = load_parent(settings, model)
    except MaintenanceError as exc:
        fail_with(exc)
    network, manifest = parent.network, parent.manifest
    params = {"mode": "model", "objective": objective, "seed": seed, "n_bootstrap": n_bootstrap, "n_splits": n_splits,
              "source": source.description, "images": len(source), "parent_version": manifest.version_id,
              "dry_run": dry_run}

    def work(job: Any) -> dict[str, Any]:
        with progress_reporter() as report:
            scored = score_source(network, source, recipe=manifest.preprocessing, output_labels=manifest.labels,
                                  device=device, batch_size=batch_size, progress=report)
        result = fit(scored.scores, scored.labels, scored.patients, objective=objective,  # type: ignore[arg-type]
                     seed=seed, n_bootstrap=n_bootstrap, fallback=manifest.thresholds, n_splits=n_splits)
        calibration = result.to_dict() | {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source.description,
            "images": len(source),
            "parent_version": manifest.version_id,
        }

        def check(reloaded: Any) -> dict[str, Any]:
            backbone, changed = backbone_check(network, reloaded)
            if not backbone or changed:
                raise ValueError(f"the saved artifact's weights differ from the parent's ({changed} classifier "
                                 "weights changed) - a calibration changes thresholds only; nothing was registered")
            return {"dtype": manifest.dtype, "weights_identical": True}

        candidate = None
        if dry_run:
            message = "dry run: no candidate was written; the active model is unchanged"
        else:
            thresholds = {label: result.thresholds.get(label, manifest.thresholds[label]) for label in manifest.labels}
            written = write_candidate(settings, network, manifest, operation="calibrate", params=params,
                                      report=calibration, check=check, thresholds=thresholds,
                                      report_key="calibration")
            candidate = written.to_dict()
            message = (f"registered candidate {written.version} (version {written.manifest_version}) with the fitted "
                       f"thresholds; the active model is unchanged - 'chexd model activate {written.version}' makes "
                       "it active")
        data = result.to_dict() | {
            "source": source.description,
            "images": len(source),
            "model": parent.info(),
            "candidate": candidate,
            "model_changed": False,
            "message": message,
        }
        job.result = _summary(result) | {"candidate": candidate["version"] if candidate else None}
        return data

    data = _run(settings, params, work)
    title = f"{manifest.name} {manifest.version_id}: {objective} thresholds on {source.description}"
    _emit(data, as_json, title)
    if manifest.synthetic and not as_json:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
