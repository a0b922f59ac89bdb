"""The ``midasbench`` command line.

Exit codes scripts can trust: 0 success; 2 bad usage, configuration or input data (nothing was run);
1 a run failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _cmd_train(args: argparse.Namespace) -> int:
    from midasbench.harness.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return EXIT_OK
    from midasbench.harness.tracking import resolve_tracking_uri
    from midasbench.harness.training.trainer import train

    result = train(cfg)
    test = result.test
    print(
        f"{result.method}: best epoch {result.best_epoch} (val acc {result.best_val['acc']:.4f}); "
        f"test acc {test['acc']:.4f}, macro-F1 {test['macro_f1']:.4f}"
    )
    if result.run_id:
        print(
            f"MLflow run {result.run_id} in {resolve_tracking_uri(cfg.tracking.uri)} "
            f"(experiment {cfg.tracking.experiment!r})"
        )
    return EXIT_OK


def _parse_options(pairs: Sequence[str]) -> dict:
    from midasbench.harness.config import apply_overrides

    return apply_overrides({}, list(pairs))


def _build_options(args: argparse.Namespace) -> dict:
    """``KEY=VALUE`` options, with ``--raw`` as ``raw`` (the raw download's root) and ``--skip-bad``."""
    options = _parse_options(args.options)
    if args.raw is not None:
        options["raw"] = str(Path(args.raw).expanduser().resolve())
    if args.skip_bad:
        options["skip_bad"] = True
    return options


def _cmd_data_build(args: argparse.Namespace) -> int:
    from midasbench.datasets import ArrowDataset, build_dataset
    from midasbench.datasets.sharded_build import BuildInterrupted

    try:
        path = build_dataset(
            args.name,
            root=args.root,
            split=args.split,
            split_seed=args.split_seed,
            options=_build_options(args),
            force=args.force,
            workers=args.workers,
            progress="auto" if args.progress is None else args.progress,
        )
    except BuildInterrupted as exc:  # say what is kept, then exit as interrupted (130)
        print(f"midasbench: {exc}", file=sys.stderr)
        raise
    _print_manifest(ArrowDataset(path))
    return EXIT_OK


def _cmd_data_import(args: argparse.Namespace) -> int:
    from midasbench.datasets import ArrowDataset
    from midasbench.datasets.importer import describe_import, import_folder

    if args.dry_run:
        print(
            describe_import(
                Path(args.folder),
                split=args.split,
                split_seed=args.split_seed,
                classes_file=args.classes_file,
                store_dtypes=_store_dtypes(args.store_dtype),
            )
        )
        return EXIT_OK
    path = import_folder(
        Path(args.folder),
        name=args.name,
        root=Path(args.root) if args.root else None,
        out=Path(args.out) if args.out else None,
        split=args.split,
        split_seed=args.split_seed,
        classes_file=args.classes_file,
        standardize=args.standardize,
        store_dtypes=_store_dtypes(args.store_dtype),
    )
    _print_manifest(ArrowDataset(path))
    return EXIT_OK


def _store_dtypes(pairs: Sequence[str] | None) -> dict[str, str]:
    """``MODALITY=DTYPE`` pairs of ``--store-dtype``."""
    from midasbench.harness.errors import ConfigError

    out = {}
    for pair in pairs or []:
        modality, sep, dtype = pair.partition("=")
        if not sep or not modality or not dtype:
            raise ConfigError(f"--store-dtype {pair!r}: expected MODALITY=DTYPE, e.g. audio=float16")
        out[modality] = dtype
    return out


def _cmd_data_extract(args: argparse.Namespace) -> int:
    from midasbench.datasets import ArrowDataset
    from midasbench.harness.config import load_config
    from midasbench.harness.training.extract import extract_features

    cfg = load_config(args.config, args.overrides)
    path = extract_features(cfg, name=args.name, root=args.root, out=args.out)
    _print_manifest(ArrowDataset(path))
    print(
        f"train heads on it: midasbench train {args.config} data.name={args.name} "
        "'model.default_encoder={name: identity}'"
    )
    return EXIT_OK


def _cmd_data_info(args: argparse.Namespace) -> int:
    from midasbench.datasets import ArrowDataset

    dataset = ArrowDataset(args.path)
    if args.verify:
        dataset.verify()
        print("content hash verified")
    _print_manifest(dataset)
    return EXIT_OK


def _print_manifest(dataset: object) -> None:
    m = dataset.manifest  # type: ignore[attr-defined]
    print(f"{dataset.directory}")  # type: ignore[attr-defined]
    print(
        f"  dataset  {m.name} v{m.version}: {len(m.classes)} classes; split {m.split_protocol}"
        + (f" (split_seed {m.split_seed})" if m.split_seed is not None else "")
    )
    for name, spec in m.modalities.items():
        print(f"  modality {name}: {spec.dtype}{list(spec.shape)} ({spec.kind})")
    print("  rows     " + ", ".join(f"{k} {v.rows}" for k, v in m.splits.items()))
    if m.subsets:
        print(f"  subsets  {', '.join(m.subsets)}")
    print(f"  sha256   {m.content_sha256}")


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


SUMMARY_WIDTH = 100
# a sentence ends at ". " or ") " before a capital, a backtick or "(" -- not after an abbreviation
_SENTENCE_END = re.compile(
    r"(?<=[.)])(?<!\bApp\.)(?<!\bFig\.)(?<!\bEq\.)(?<!\bTab\.)(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)"
    r"\s(?=[A-Z`(])"
)


def _leading_comment(text: str) -> str:
    """A YAML file's leading ``#`` comment block as text (the preset's description)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def _first_sentence(text: str | None, name: str) -> str:
    """The first sentence of a docstring's first paragraph (wrapped lines joined), without a leading
    ``name``: label, shortened at a word to ``SUMMARY_WIDTH`` characters."""
    paragraph = " ".join((text or "").strip().split("\n\n", 1)[0].split())
    paragraph = re.sub(rf"^``{re.escape(name)}``:\s*", "", paragraph)
    sentence = re.split(_SENTENCE_END, paragraph, maxsplit=1)[0]
    return textwrap.shorten(sentence, SUMMARY_WIDTH, placeholder=" …")


def _method_summary(cls: type) -> str:
    """The class's own docstring (else its module's) first sentence, then its parameters with defaults."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__
    summary = _first_sentence(doc, getattr(cls, "name", ""))
    params = ", ".join(f"{name}={field.default!r}" for name, field in cls.Params.model_fields.items())
    if not params:
        return summary
    wrapped = textwrap.fill(params, width=104, initial_indent="    params: ", subsequent_indent=" " * 12)
    return f"{summary}\n{wrapped}"


def _cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if what == "methods":
        from midasbench.methods import METHODS

        rows = [(n, f"[{c.fidelity}] {_method_summary(c)}") for n, c in METHODS.items()]
    elif what == "datasets":
        from midasbench.datasets import DATASETS

        rows = [(n, c.description) for n, c in DATASETS.items()]
    elif what == "encoders":
        from midasbench.harness.models.encoders import ENCODERS

        rows = [(n, e.description) for n, e in ENCODERS.items()]
    elif what == "fusions":
        from midasbench.harness.models.fusion import FUSIONS

        rows = [(n, e.description) for n, e in FUSIONS.items()]
    elif what == "transforms":
        from midasbench.datasets.transforms import TRANSFORMS

        rows = [(n, e.description) for n, e in TRANSFORMS.items()]
    else:
        from importlib import resources

        from midasbench.harness.config import preset_names

        folder = resources.files("midasbench.harness") / "presets"
        texts = {n: _leading_comment((folder / f"{n}.yaml").read_text()) for n in preset_names()}
        rows = [(n, _first_sentence(text, n)) for n, text in texts.items()]
    width = max((len(n) for n, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from midasbench.harness.demo import run_demo

    result = run_demo(
        seeds=args.seeds,
        preset=args.preset,
        experiment=args.experiment,
        overrides=args.overrides,
        address=args.address,
        ddp_check=not args.no_ddp_check,
    )
    print()
    print(result.table)
    print()
    if result.ddp_check:
        print(result.ddp_check)
    if result.report:
        print(f"HTML report with {result.figures} figures: {result.report}")
    print(
        f"{result.runs} runs in {result.seconds:.0f} s (parent run {result.parent_run_id}); "
        f"see them with: mlflow ui --backend-store-uri {result.tracking_uri}"
    )
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from midasbench.harness.sweeps.sweep import expand, load_sweep, run_sweep

    spec = load_sweep(args.sweep_file)
    plan = expand(spec, args.sweep_file)
    if args.dry_run:
        print(plan.table())
        print(f"{len(plan.trials)} trials")
        return EXIT_OK
    outcome = run_sweep(
        plan,
        resume=args.resume,
        address=args.address,
        tracking_uri=args.tracking_uri,
        sweep_file_text=Path(args.sweep_file).read_text(),
    )
    print(
        f"sweep {outcome.name}: {outcome.ran} trials run, {outcome.skipped} already done, "
        f"{len(outcome.failed)} failed, in {outcome.seconds:.0f} s; "
        f"MLflow parent run {outcome.parent_run_id} "
        f"(experiment {outcome.experiment!r}, {outcome.tracking_uri})"
    )
    from midasbench.analysis import load_runs, markdown_table, summarize

    children = f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    runs = load_runs(outcome.experiment, outcome.tracking_uri, children)
    if not runs.empty:
        metrics = ("test/acc", "test/macro_f1")
        print()
        print(markdown_table(summarize(runs, metrics), metrics))
    if outcome.failed:
        print(f"failed trials: {', '.join(outcome.failed)}; rerun with --resume", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_tune_lambda(args: argparse.Namespace) -> int:
    from midasbench.harness.sweeps.lambda_tuning import lambda_sweep_spec, tune_lambda

    lambdas = tuple(float(v) for v in args.lambdas.split(","))
    spec = lambda_sweep_spec(
        args.dataset,
        lambdas,
        seeds=args.seeds,
        method=args.method,
        overrides=args.overrides,
        storage=args.storage,
        asha=args.asha,
    )
    choice = tune_lambda(spec, args.dataset, resume=args.resume, address=args.address)
    print(choice.markdown)
    return EXIT_OK


def _cmd_tracking_server(args: argparse.Namespace) -> int:
    from midasbench.harness.errors import ConfigError
    from midasbench.harness.tracking.server import ServerSizing, server_command, supervise

    sizing = ServerSizing.from_environment(
        workers=args.workers,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        max_connections=args.max_connections,
    )
    sizing.check()
    if (args.backend_store_uri is None) == (args.postgres_dir is None):
        raise ConfigError("tracking-server: give either --backend-store-uri or --postgres-dir")
    print(
        f"tracking-server: {sizing.workers} workers × (pool {sizing.pool_size} + overflow "
        f"{sizing.max_overflow}) connections, under max_connections {sizing.max_connections}",
        file=sys.stderr,
    )
    store, postgres = args.backend_store_uri, None
    if args.postgres_dir is not None:
        from midasbench.harness.tracking.postgres import LocalPostgres

        postgres = LocalPostgres(Path(args.postgres_dir), args.postgres_port, sizing.max_connections)
        store = postgres.ensure_running()
        print(f"tracking-server: PostgreSQL in {postgres.data_dir}, {store}", file=sys.stderr)
    command = server_command(store, args.artifacts_destination, args.host, args.port, sizing.workers)
    try:  # the store's own database is started again whenever it is found down, and stopped with the server
        keep_up = postgres.keep_up if postgres is not None else None
        supervise(command, sizing.environment(), restart_delay_s=args.restart_delay, keep_up=keep_up)
    finally:
        if postgres is not None:
            postgres.stop()
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from midasbench.analysis.paper import make_report
    from midasbench.analysis.report import ReportError

    try:
        report = make_report(
            args.experiment,
            tracking_uri=args.tracking_uri,
            parent=args.parent,
            table=args.table,
            fmt=args.format,
            out=args.out,
            figures_dir=args.figures,
            figures=not args.no_figures,
            reference=args.reference,
            allow_mixed=args.allow_mixed,
            datasets=args.datasets.split(",") if args.datasets else None,
        )
    except (LookupError, ReportError) as exc:  # nothing to report on: bad input, not a failed run
        print(f"midasbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # the table goes to stdout unless --out is given; everything else is a message on stderr
    if report.out is None:
        print(report.text, end="")
    else:
        print(f"wrote {report.out}", file=sys.stderr)
    for figure in report.figures:
        print(f"figure {figure.path}", file=sys.stderr)
    for skipped in report.skipped_figures:
        print(f"figure skipped: {skipped}", file=sys.stderr)
    if report.logged_to:
        print(f"logged the report and figures on MLflow run {report.logged_to} (report/)", file=sys.stderr)
    return EXIT_OK


REPORT_TABLES = ("main", "ablation", "augment", "lambda", "modality")  # analysis.report.LAYOUTS
REPORT_FORMATS = ("md", "latex", "csv", "html")  # analysis.render.FORMATS


def build_parser() -> argparse.ArgumentParser:
    from midasbench.datasets.splits import SPLIT_PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="midasbench",
        description="Benchmark imbalanced multimodal learning methods (MIDAS and baselines), "
        "tracked in MLflow.",
        epilog="Exit codes: 0 ok, 1 run failed, 2 bad usage/config/data, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one run from a config file or preset",
        description="Train one run. CONFIG is a YAML file or a preset name "
        "(`midasbench list presets`); KEY=VALUE pairs override it, e.g. train.epochs=5 "
        "method.name=unimodal method.params.modality=weak.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    data = sub.add_parser("data", help="build, import or inspect datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("build", help="build a registered offline dataset into the canonical format")
    p.add_argument("name")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="builder options, e.g. audio_snr_db=0")
    p.add_argument("--split", choices=SPLIT_PROTOCOLS, default="midas70")
    p.add_argument("--split-seed", type=int, default=2)
    p.add_argument("--root", help="data root (default $MIDASBENCH_DATA or ~/.cache/midasbench/data)")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if a complete copy exists (also discards the shards of an interrupted build)",
    )
    p.add_argument("--raw", metavar="PATH", help="root of the raw download (README 'Datasets')")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip samples whose raw file cannot be decoded (listed in the manifest) instead of failing",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes decoding the samples (default: every core; 1: in this process, no pool)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )
    p.set_defaults(func=_cmd_data_build)

    p = data.add_parser(
        "import", help="import your own data (labels.csv + one .npy/.parquet/folder per modality)"
    )
    p.add_argument("folder")
    p.add_argument("--name", required=True, help="dataset name; train with data.name=NAME")
    p.add_argument("--split", choices=SPLIT_PROTOCOLS, default="midas70")
    p.add_argument("--split-seed", type=int, default=2)
    p.add_argument("--root", help="data root to import into (default as for build)")
    p.add_argument("--out", help="exact output directory (overrides --root)")
    p.add_argument(
        "--classes-file", help="class names, one per line in class-index order (default classes.txt)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the folder and print what would be imported; write nothing",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="rescale float modalities to zero mean and unit std with training-split statistics "
        "(stored in the manifest)",
    )
    p.add_argument(
        "--store-dtype",
        action="append",
        metavar="MODALITY=DTYPE",
        help="store a modality narrower, e.g. audio=float16 or frames=uint8 (every value must fit); "
        "the device casts it back to float32",
    )
    p.set_defaults(func=_cmd_data_import)

    p = data.add_parser(
        "extract",
        help="encode a dataset once with a config's encoders and store the features (the frozen track)",
        description="Run CONFIG's encoders (model.encoders, model.init_encoders; eval mode) over every split "
        "of its dataset and write the embeddings as dataset NAME, with the encoders and their weights' hash "
        "in its manifest. Train heads on it with 'model.default_encoder={name: identity}'.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--name", required=True, help="the features' dataset name; train with data.name=NAME")
    p.add_argument("--root", help="data root to write into (default as for build)")
    p.add_argument("--out", help="exact output directory (overrides --root)")
    p.set_defaults(func=_cmd_data_extract)

    p = data.add_parser("info", help="describe a dataset directory")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="recompute the content hash")
    p.set_defaults(func=_cmd_data_info)

    tune_parser = sub.add_parser("tune", help="tune a hyperparameter per dataset on validation accuracy")
    tune_sub = tune_parser.add_subparsers(dest="tune_command", required=True, metavar="WHAT")
    p = tune_sub.add_parser("lambda", help="choose MIDAS's λ for a dataset (paper Table 6), never on test")
    p.add_argument("--dataset", required=True, help="a dataset preset, e.g. synthetic, avdigits, cremad")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every trial")
    p.add_argument("--lambdas", default="0.5,1,2,5,10,20", help="comma-separated λ values")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--method", default="midas", help="midas or midas-code")
    p.add_argument("--storage", help="sweep storage folder (default ./.midasbench/sweeps)")
    p.add_argument("--asha", action="store_true", help="stop poor λ early with ASHA (large searches)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.set_defaults(func=_cmd_tune_lambda)

    p = sub.add_parser(
        "sweep",
        help="run a sweep file on Ray Tune (one MLflow child run per trial)",
        description="Expand a sweep file (base config + grid/random axes) into trials and run them on Ray.",
    )
    p.add_argument("sweep_file")
    p.add_argument("--dry-run", action="store_true", help="print the trial table and its size, run nothing")
    p.add_argument("--resume", action="store_true", help="finish a sweep: run only its unfinished trials")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the base config's, else ./mlflow.db)"
    )
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="the paper's tables (and figures) from an experiment's MLflow runs",
        description="Aggregate an experiment's finished runs over seeds (mean ± sample std, ddof=1) into one "
        "of the paper's tables: main (Table 1), ablation (Table 2), augment (Table 3), lambda (Table 6) or "
        "modality (zeroed-modality accuracy, Shapley values, misaligned top-2). Best per column bold, second "
        "underlined; † marks cells with fewer runs than usual. Figures (Fig. 3-6, λ curve) are written "
        "beside --out or into --figures, and embedded in --format html.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument("--parent", metavar="RUN_ID", help="only this sweep's child runs; log figures on it")
    p.add_argument("--table", choices=REPORT_TABLES, default="main")
    p.add_argument("--format", choices=REPORT_FORMATS, help="default: from --out's suffix, else md")
    p.add_argument("--out", metavar="PATH", help="write the report here (default: stdout)")
    p.add_argument("--figures", metavar="DIR", help="write the figures here (default: beside --out)")
    p.add_argument("--no-figures", action="store_true", help="make no figures")
    p.add_argument(
        "--reference",
        metavar="METHOD",
        help="mark cells that differ from this row (Welch's t-test, p < 0.05)",
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="aggregate cells whose runs differ in split protocol, fidelity or method params",
    )
    p.add_argument(
        "--datasets",
        help="only these datasets, comma-separated (Table 7: --table main --datasets sarcasm,twitter2015)",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "list", help="list registered methods, datasets, encoders, fusions, transforms or presets"
    )
    p.add_argument("what", choices=["methods", "datasets", "encoders", "fusions", "transforms", "presets"])
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "tracking-server",
        help="run a cluster's MLflow server, sized for its trials and restarted whenever it dies",
        description="Runs `mlflow server` and starts it again when it exits. Sizing defaults come from "
        "MIDASBENCH_MLFLOW_WORKERS, MLFLOW_SQLALCHEMYSTORE_POOL_SIZE, MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW "
        "and MIDASBENCH_DB_MAX_CONNECTIONS; workers × (pool + overflow) must stay under max_connections.",
    )
    p.add_argument("--backend-store-uri", help="e.g. postgresql://mlflow:mlflow@127.0.0.1/mlflow")
    p.add_argument(
        "--postgres-dir",
        help="instead: run the store's own PostgreSQL with its data in this folder (created on first use; "
        "loopback only, trusted local users) and start it again whenever it is down",
    )
    p.add_argument("--postgres-port", type=int, default=5432, help="its port (default 5432)")
    p.add_argument("--artifacts-destination", required=True, help="a folder or s3:// prefix")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument(
        "--workers", type=int, help="server worker processes (default $MIDASBENCH_MLFLOW_WORKERS or 4)"
    )
    p.add_argument("--pool-size", type=int, help="SQLAlchemy pool per worker (default 20)")
    p.add_argument(
        "--max-overflow", type=int, help="extra connections per worker beyond the pool (default 20)"
    )
    p.add_argument("--max-connections", type=int, help="the database's max_connections (default 300)")
    p.add_argument("--restart-delay", type=float, default=2.0, help="seconds before a dead server restarts")
    p.set_defaults(func=_cmd_tracking_server)

    p = sub.add_parser(
        "demo", help="joint, MIDAS and unimodal baselines on offline data, 3 seeds, then the table"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--preset", default="synthetic", help="an offline dataset preset: synthetic or avdigits")
    p.add_argument("--experiment", default="midasbench-demo")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--no-ddp-check", action="store_true", help="skip the 2-worker Ray Train trial at the end")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial database tables" chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    from midasbench.datasets.format import DatasetFormatError
    from midasbench.harness.errors import ConfigError
    from midasbench.harness.registry import UnknownEntryError

    try:
        return int(args.func(args))
    except (ConfigError, DatasetFormatError, UnknownEntryError) as exc:
        print(f"midasbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("midasbench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`midasbench list methods | head -1`): not a failure
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return EXIT_OK
    except Exception as exc:  # a run failed: say what, keep the traceback for --debug users
        if os.environ.get("MIDASBENCH_DEBUG"):
            raise
        print(
            f"midasbench: run failed: {type(exc).__name__}: {exc} (set MIDASBENCH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
