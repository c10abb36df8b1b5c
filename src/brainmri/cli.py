"""The `brainmri` command. Stages run through DVC (`dvc repro`); this command
holds the tools around them: check params, predict, serve, export."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from brainmri import __version__
from brainmri.core.backend import start_tensorflow_quietly
from brainmri.core.errors import BrainMRIError, DataError, ModelError
from brainmri.core.params import Params, check_folders, load_params
from brainmri.serve.audit import AuditLog


def check(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    check_folders(params)  # without DVC, which would block on a named pipe in ingest.source
    print(f"{args.params}: valid (ingest.source={params.ingest.source}, train.model={params.train.model})")
    return 0


def project_params(path: str) -> Params:
    """params.yaml when run inside the project; the schema's defaults anywhere else."""
    if Path(path).is_file():
        return load_params(path)
    return Params.model_validate({"ingest": {"source": "."}})


def audit_log(params: Params) -> AuditLog | None:
    a = params.audit
    return AuditLog(a.file, a.max_mb, a.backups) if a.file else None


MODEL_COMMANDS = ("predict", "serve", "export")  # the ones that load Keras
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def load_predictor(models: list[str] | None, params: Params):
    """The --model models (default: models/) as the project's params read them; predict.tta adds flips."""
    from brainmri.data.ingest import decode_limits, scanner_options
    from brainmri.serve.inference import Predictor

    predictor = Predictor.load_ensemble(
        models or ["models"],
        decode_limits(params.ingest),
        params.evaluate.review_threshold,
        params.evaluate.target_accuracy,
        scanner_options(params.ingest),
    )
    return predictor.with_flip_tta() if params.predict.tta else predictor


def spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (a file named `=HYPERLINK(...)`), quoted
    with a leading apostrophe as OWASP advises; other values as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from brainmri.core.images import sha256_file
    from brainmri.data.scanner import split_slice_path
    from brainmri.serve.inference import image_files

    params = project_params(args.params)
    files = image_files(args.paths)
    if not files:
        raise DataError("brainmri predict: no image files found in " + ", ".join(args.paths))
    predictor = load_predictor(args.model, params)
    if args.gradcam and not predictor.explainable:
        raise ModelError(f"--gradcam needs the Keras model; {predictor.version} is an export without gradients")
    audit = audit_log(params)
    output = open(args.output, "w", newline="") if args.output else sys.stdout
    columns = [
        "path",
        "predicted_class",
        "confidence",
        "needs_review",
        "review_reason",
        *[f"p_{name}" for name in predictor.classes],
        "error",
        "notice",
    ]
    writer = csv.DictWriter(output, columns) if args.format == "csv" else None
    if writer:
        writer.writeheader()
    if args.gradcam:
        Path(args.gradcam).mkdir(parents=True, exist_ok=True)
    failures = 0
    progress = tqdm(
        total=len(files), unit="file", file=sys.stderr, disable=not any(Path(item).is_dir() for item in args.paths)
    )
    for number, (result, array) in enumerate(predictor.predict_files_with_inputs(files, args.batch_size)):
        if result.get("slice", 0) == 0:  # the bar counts files; a scanner file gives a result per slice
            progress.update()
        failures += "error" in result
        if audit and "error" not in result:
            audit.record(
                "predict",
                sha256_file(split_slice_path(result["path"])[0]),
                predictor.version,
                result,
                result.get("slice"),
            )
        if writer:
            writer.writerow(
                {key: spreadsheet_safe(result.get(key, "")) for key in columns[:5] + ["error", "notice"]}
                | {f"p_{name}": p for name, p in result.get("probabilities", {}).items()}
            )
        else:
            output.write(json.dumps(result) + "\n")
        if args.gradcam and "error" not in result:
            png = predictor.gradcam_png(array, predictor.classes.index(result["predicted_class"]))
            (Path(args.gradcam) / f"{number:05d}_{Path(result['path']).stem.replace('#', '_')}.png").write_bytes(png)
    progress.close()
    if output is not sys.stdout:
        output.close()
    if failures:
        print(f"brainmri predict: {failures} of {len(files)} files were not readable images", file=sys.stderr)
    return 2 if failures else 0


def serve(args: argparse.Namespace) -> int:
    from brainmri.core.paths import figures_file
    from brainmri.serve.webapp import create_app, measured_localisation, run_server

    params = project_params(args.params)
    predictor = load_predictor(args.model, params)
    localisation = measured_localisation(args.model, figures_file("gradcam"))
    app = create_app(predictor, params.serve, audit_log(params), bind_host=args.host, localisation=localisation)
    run_server(app, args.host, args.port, params.serve)
    return 0


def compare(args: argparse.Namespace) -> int:
    from brainmri.model.compare import compare_refs

    print(compare_refs(args.a, args.b, markdown=args.md), end="")
    return 0


def export(args: argparse.Namespace) -> int:
    from brainmri.model.export import export_all

    p = project_params(args.params).export
    for summary in export_all(args.model, args.out, args.data, p.formats, p.calibration_images).values():
        print(
            f"{Path(args.out) / summary['file']}: {summary['bytes']:,} bytes, max |export - Keras| "
            f"{summary['max_abs_difference']:.2g} on {summary['checked_images']} images"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainmri", description=__doc__)
    parser.add_argument("--version", action="version", version=f"brainmri {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check_parser = commands.add_parser("check", help="validate params.yaml without running anything")
    check_parser.add_argument("params", nargs="?", default="params.yaml")
    check_parser.set_defaults(handler=check)

    model_help = (
        "a model folder (default: models) or an MLflow model URI: runs:/<run>/model, models:/<name>/<version>, "
        "models:/<name>@champion; repeat for an ensemble (the members' probabilities are averaged)"
    )
    predict_parser = commands.add_parser("predict", help="classify image files or folders")
    predict_parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)"
    )
    predict_parser.add_argument("--model", action="append", help=model_help)
    predict_parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    predict_parser.add_argument("--output", "-o", help="write here instead of standard output")
    predict_parser.add_argument("--gradcam", metavar="DIR", help="also save a Grad-CAM overlay per image here")
    predict_parser.add_argument("--batch-size", type=int, default=64)
    predict_parser.add_argument("--params", default="params.yaml", help="for evaluate.review_threshold")
    predict_parser.set_defaults(handler=predict)

    serve_parser = commands.add_parser("serve", help="the web page and JSON API (production WSGI server)")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--model", action="append", help=model_help)
    serve_parser.add_argument("--params", default="params.yaml", help="for serve.* and evaluate.review_threshold")
    serve_parser.set_defaults(handler=serve)

    compare_parser = commands.add_parser(
        "compare", help="is run B better than run A on the same test images? (paired bootstrap, McNemar)"
    )
    ref_help = "a DVC revision or experiment name, workspace, an MLflow run id of evaluate, or a predictions CSV"
    compare_parser.add_argument("a", help=ref_help)
    compare_parser.add_argument("b", help=ref_help)
    compare_parser.add_argument("--md", action="store_true", help="Markdown, to paste into a pull request")
    compare_parser.set_defaults(handler=compare)

    export_parser = commands.add_parser("export", help="TFLite (float32, float16, int8) and ONNX (float32, int8) files")
    export_parser.add_argument("--model", default="models", help="model folder")
    export_parser.add_argument("--out", default="exports")
    export_parser.add_argument("--data", default="data/prepared", help="shards: int8 calibration images")
    export_parser.add_argument("--params", default="params.yaml", help="for export.*")
    export_parser.set_defaults(handler=export)

    args = parser.parse_args(argv)
    if args.command in MODEL_COMMANDS:
        start_tensorflow_quietly()
    try:
        return args.handler(args)
    except BrainMRIError as error:  # the library raises; here it becomes one line and an exit status
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
