"""The ``vspw-ray`` command line. Each subcommand parses arguments and calls one function."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from vspw_ray.runtime import STOPPED  # light (no torch, Ray or MLflow): the stop line

__all__ = ["main", "build_parser", "STOPPED"]


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 120x160), got '{text}'") from None


def _cmd_data_check(args) -> int:
    from vspw_ray.data.check import check_dataset
    from vspw_ray.progress import progress_printer

    problems = check_dataset(args.root, args.split or None,
                             progress=progress_printer("checking", "videos"))
    for problem in problems:
        print(f"ERROR {problem}")
    splits = ", ".join(args.split) if args.split else "all splits"
    if problems:
        print(f"{len(problems)} problems in {args.root} ({splits}); fix or remove the frames "
              f"named above, or set data.skip_bad_frames=true to skip them in training")
        return 1
    print(f"{args.root}: clean ({splits})")
    print(_fingerprints(args.root, args.split))
    return 0


def _fingerprints(root: str, splits: list[str] | None) -> str:
    """The data's fingerprint lines (what every id of results on this data covers)."""
    from vspw_ray.data.check import available_splits
    from vspw_ray.data.fingerprint import data_fingerprint

    splits = list(splits or available_splits(root))
    lines = [f"fingerprint {data_fingerprint(root, splits)} (class table + {', '.join(splits)})"]
    lines += [f"  {s}: {data_fingerprint(root, (s,))}" for s in splits if len(splits) > 1]
    return "\n".join(lines)


def _cmd_data_synth(args) -> int:
    from vspw_ray.data.synth import SynthSpec, synthesize
    from vspw_ray.progress import progress_printer

    spec = SynthSpec(videos=args.videos, frames=args.frames, classes=args.classes,
                     height=args.size[0], width=args.size[1], seed=args.seed)
    splits = synthesize(args.out, spec, progress=progress_printer("synthesizing", "videos"))
    counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {args.videos} videos x {args.frames} frames ({counts}) to {args.out}")
    return 0


def _cmd_data_stats(args) -> int:
    from vspw_ray.data.stats import class_stats, write_stats
    from vspw_ray.progress import progress_printer

    stats = class_stats(args.root, args.split, progress=progress_printer("counting", "videos"))
    paths = write_stats(stats, args.out, alpha=args.alpha)
    total = sum(c["pixels"] for c in stats["classes"])
    print(f"{'class':<28} {'pixels':>14} {'share %':>8} {'videos':>7}")
    for c in sorted(stats["classes"], key=lambda c: -c["pixels"]):
        share = 100 * c["pixels"] / total if total else 0.0
        print(f"{c['name']:<28} {c['pixels']:>14,} {share:>8.3f} {c['videos']:>7}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(_fingerprints(args.root, [args.split]))
    return 0


def _cmd_evaluate(args) -> int:
    from vspw_ray.evaluate import evaluate_predictions, format_report, write_report
    from vspw_ray.progress import progress_printer

    if bool(args.pred) == bool(args.store) or (args.store and not args.variant):
        print("error: give either --pred PRED_DIR, or --store STORE with --variant ID",
              file=sys.stderr)
        return 2
    if args.store:
        from vspw_ray.evaluate import evaluate_store

        report = evaluate_store(args.store, args.variant, args.root, args.split, fold=args.fold,
                                fold_seed=args.fold_seed,
                                progress=progress_printer("evaluating", "videos"))
    else:
        report = evaluate_predictions(args.pred, args.root, args.split, fold=args.fold,
                                      fold_seed=args.fold_seed,
                                      progress=progress_printer("evaluating", "videos"))
    print(format_report(report))
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_config_show(args) -> int:
    from vspw_ray.config import dump_yaml, load_config, resolve_variant, variant_id
    from vspw_ray.errors import DataError

    cfg = load_config(args.experiment, args.overrides)
    if args.variant:
        cfg = resolve_variant(cfg, args.variant)
    print(dump_yaml(cfg), end="")
    try:
        if cfg.variants:
            ids = [(spec.name, variant_id(resolve_variant(cfg, spec.name)))
                   for spec in cfg.variants]
            print("# variants:\n" + "\n".join(f"#   {name}: {vid}" for name, vid in ids))
        else:
            print(f"# variant_id: {variant_id(cfg)}")
    except DataError as err:  # the YAML above is complete; only the ids need the data
        print(f"# variant ids: not shown: {err}")
    return 0


def _cmd_config_diff(args) -> int:
    import json

    from vspw_ray.config import config_diff, load_config

    rows = config_diff(load_config(args.a), load_config(args.b))
    width = max([len(k) for k, _, _ in rows] + [3])
    show = lambda v: "-" if v is None else json.dumps(v)  # noqa: E731
    print(f"{'key':<{width}}  {args.a}  ->  {args.b}")
    for key, a, b in rows:
        print(f"{key:<{width}}  {show(a)}  ->  {show(b)}")
    print(f"{len(rows)} setting(s) differ")
    return 0


def _checkpoint_path(path: str) -> str:
    """A checkpoint folder (as Ray Train writes them) or the file inside it."""
    from pathlib import Path

    from vspw_ray.checkpoints import CHECKPOINT_FILE, checkpoint_file
    from vspw_ray.storage import is_uri

    if is_uri(path):
        return checkpoint_file(path)
    return str(Path(path) / CHECKPOINT_FILE) if Path(path).is_dir() else path


def _context(args, cfg):
    """The context a stage runs in from the command line: the experiment alone."""
    from vspw_ray.stages import StageContext

    return StageContext(cfg, address=args.address, track=not args.no_track,
                        threads=getattr(args, "torch_threads", 1))


def _tracked(record) -> None:
    if record.run_id:
        print(f"MLflow run: {record.run_id}")


def _cmd_train(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.stages import train

    overrides = list(args.overrides)
    if args.from_checkpoint:
        overrides.append(f"model.init_checkpoint={_checkpoint_path(args.from_checkpoint)}")
    cfg = load_config(args.experiment, overrides)
    out = train.run(_context(args, cfg), args.variant)
    shown = {k: round(v, 4) for k, v in out.metrics.items()
             if k.split("/")[-1] in ("miou", "fwiou", "vc8", "vc16") and isinstance(v, float)}
    print(f"variant {out.variant_id} done: {shown}")
    print(f"best checkpoint: {out.checkpoint}\nlatest checkpoint: {out.latest_checkpoint}")
    _tracked(out)
    return 0


def _cmd_swa(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.stages import swa
    from vspw_ray.train.swa import format_comparison

    cfg = load_config(args.experiment, args.overrides)
    out = swa.run(_context(args, cfg), args.variant, from_checkpoint=args.from_checkpoint)
    print(f"SWA {out.variant_id} (from {out.parent_variant_id}, {out.base_checkpoint}); "
          f"val IoU in %:")
    print(format_comparison(out.metrics))
    print(f"averaged checkpoint: {out.checkpoint}")
    _tracked(out)
    return 0


def _cmd_tune(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.stages import search

    cfg = load_config(args.experiment, args.overrides)
    out = search.run(_context(args, cfg))
    print(out.summary)
    print(f"Optuna study '{out.study_name}' in {out.optuna_storage} "
          f"(optuna-dashboard {out.optuna_storage})")
    if out.run_id:
        print(f"MLflow sweep run: {out.run_id}")
    return 0


def _cmd_infer(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.progress import progress_printer
    from vspw_ray.stages import infer

    cfg = load_config(args.experiment, args.overrides)
    out = infer.run(_context(args, cfg), infer.item_of(args.variant, args.split),
                    checkpoint=args.checkpoint, store=args.store, predictions=args.out,
                    progress=progress_printer("inferring", "frames"))
    print(f"{out.member_key} on {out.split}: {out.frames} frames written "
          f"({out.frames_per_s:.2f} frames/s), {len(out.skipped)} skipped; store {out.store} "
          f"({out.store_bytes / 2**20:.1f} MiB); predictions {out.predictions}")
    for frame in out.skipped:
        print(f"  skipped {frame}")
    if out.metrics:
        print("  " + "  ".join(f"{k} {100 * v:.2f}" for k, v in out.metrics.items()))
    _tracked(out)
    return 0


def _cmd_pipeline(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.pipeline.run import run_pipeline

    cfg = load_config(args.experiment, args.overrides)
    out = run_pipeline(cfg, address=args.address, track=not args.no_track, dry_run=args.dry_run,
                       torch_threads=args.torch_threads)
    if out.run_id:
        print(f"MLflow pipeline run: {out.run_id}")
    return 0


def _cmd_status(args) -> int:
    import json

    from vspw_ray.config import load_config
    from vspw_ray.pipeline.status import experiment_status, format_status, status_json

    rows = experiment_status(load_config(args.experiment, args.overrides))
    print(json.dumps(status_json(rows), indent=1) if args.json else format_status(rows))
    return 0


def _cmd_ensemble(args) -> int:
    from vspw_ray.config import load_config
    from vspw_ray.stages import ensemble

    cfg = load_config(args.experiment, args.overrides)
    out = ensemble.run(_context(args, cfg), apply=args.apply)
    print(f"ensemble {out.ensemble_id}: report in {out.report}")
    if out.submission:
        print(f"submission: {out.zip} (manifest {out.submission}/manifest.json)")
    _tracked(out)
    return 0


def _experiment_args(p: argparse.ArgumentParser, *, variant: bool = False) -> None:
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    if variant:
        p.add_argument("--variant",
                       help="variant name or variant_id (required when several exist)")


def _run_options(p: argparse.ArgumentParser, threads_help: str = "torch threads per worker") -> None:
    """Options every command that runs on Ray takes."""
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--torch-threads", type=int, default=1, help=threads_help)
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-dashboard", action="store_true",
                   help="start a local Ray instance without its dashboard, which serves Ray's "
                        "State API (saves ~1 s of start-up; a cluster has its own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vspw-ray",
        description="Train, search, infer and ensemble video scene parsing models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_data_commands, _evaluate_command, _stage_commands, _pipeline_commands,
                _config_commands):
        add(sub)
    return parser


def _data_commands(sub) -> None:
    data = sub.add_parser("data", help="check, describe or synthesize VSPW-layout datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("check", help="report every bad video, frame and mask")
    p.add_argument("root", help="dataset root (holds data/, train.txt, label_num_dic_final.json)")
    p.add_argument("--split", action="append", help="split to check (repeatable; default: all)")
    p.set_defaults(func=_cmd_data_check)

    p = dsub.add_parser("synth", help="write a synthetic VSPW-layout dataset")
    p.add_argument("out")
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--size", type=_size, default=(120, 160), help="HxW (default 120x160)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_synth)

    p = dsub.add_parser("stats", help="class frequencies, chart and class prior of a split")
    p.add_argument("root")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="folder for class_stats.json/.png, class_prior.json")
    p.add_argument("--alpha", type=float, default=1.0, help="Laplace smoothing in pixels")
    p.set_defaults(func=_cmd_data_stats)


def _evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="official VSPW metrics of prediction PNGs or stored scores")
    p.add_argument("--pred", help="folder of <video>/<frame>.png reduced ids")
    p.add_argument("--store", help="a score store written by vspw-ray infer (with --variant)")
    p.add_argument("--variant", help="the store member (its key, as vspw-ray infer prints) to score")
    p.add_argument("--root", required=True, help="dataset root")
    p.add_argument("--split", default="val")
    p.add_argument("--fold", choices=["A", "B", "all"], default=None)
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON here")
    p.set_defaults(func=_cmd_evaluate)


def _stage_commands(sub) -> None:
    """train, swa, infer, tune: one stage each."""
    p = sub.add_parser("train", help="train one variant on Ray Train (resumes when re-run)")
    _experiment_args(p, variant=True)
    p.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from these weights (sets model.init_checkpoint)")
    _run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("swa", help="stochastic weight averaging after training (resumes when re-run)")
    _experiment_args(p, variant=True)
    p.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder or checkpoint.pt (default: the variant's best)")
    _run_options(p)
    p.set_defaults(func=_cmd_swa)

    p = sub.add_parser("infer", help="TTA inference into a Parquet score store (Ray Data; resumes)")
    _experiment_args(p, variant=True)
    p.add_argument("--checkpoint", help="checkpoint folder or checkpoint.pt (default: the "
                                        "variant's SWA average, else its best checkpoint)")
    p.add_argument("--split", default="val", help="val or test (any split file of data.root)")
    p.add_argument("--store", help="score store (default: <storage.path>/scores)")
    p.add_argument("--out", help="prediction PNG folder (default: "
                                 "<storage.path>/predictions/<member key>/<split>)")
    _run_options(p, "torch threads per model actor")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("tune", help="search tune.space with Ray Tune + Optuna (resumes when re-run)")
    _experiment_args(p)
    _run_options(p)
    p.set_defaults(func=_cmd_tune)


def _pipeline_commands(sub) -> None:
    """pipeline, status, ensemble."""
    p = sub.add_parser("pipeline", help="every stage in order, each skipped when its output for "
                                        "the same settings exists (resumes when re-run)")
    _experiment_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps to run and skip, resources, GPU-hours); change "
                        "nothing")
    _run_options(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("status", help="where the experiment's pipeline stands, from storage alone "
                                      "(no Ray): each step done, running, stale or missing, with "
                                      "its headline figure and measured cost")
    _experiment_args(p)
    p.add_argument("--json", action="store_true", help="one JSON list of the rows, for scripts")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ensemble", help="choose an ensemble on val, cross-fitted (A->B, B->A) "
                                        "beside every single member and the plain mean, report "
                                        "it, write the submission (--apply test)")
    _experiment_args(p)
    p.add_argument("--apply", metavar="SPLIT",
                   help="fuse this split's scores with the chosen fusion into submission PNGs, "
                        "a zip and a manifest (test; val works too)")
    _run_options(p)
    p.set_defaults(func=_cmd_ensemble)


def _config_commands(sub) -> None:
    cfg = sub.add_parser("config", help="show an experiment's resolved config")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = csub.add_parser("show", help="print the resolved YAML and variant ids")
    _experiment_args(p)
    p.add_argument("--variant")
    p.set_defaults(func=_cmd_config_show)
    p = csub.add_parser("diff", help="print the settings that differ between two experiments "
                                     "(resolved: defaults filled in, variants by name)")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_config_diff)


SHUTDOWN_AFTER_STOP_S = 15.0  # for Ray's shutdown after a stop: well within a job's stop wait


def _stopped_exit(code: int) -> int:
    """Exit at once after a stop (the MLflow runs are ended and the stop line printed by now):
    Ray is shut down, its local instance with it, for at most ``SHUTDOWN_AFTER_STOP_S`` (a
    shutdown can wait on a Train or Tune run still polled by a helper thread), and the process
    ends without waiting for threads that still wait on Ray (the pipeline runs variants in
    threads, which Python would join at exit), so a stopped job ends within Ray's stop wait
    (``RAY_JOB_STOP_WAIT_TIME_S``). What they left is resumable: a checkpoint, score file or
    record counts only once written whole."""
    import threading

    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    if not connected and not [t for t in threading.enumerate() if t is not
                              threading.main_thread() and not t.daemon and t.is_alive()]:
        return code  # nothing to wait for: an ordinary return
    sys.stdout.flush()
    sys.stderr.flush()
    if connected:
        closing = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
        closing.start()
        closing.join(SHUTDOWN_AFTER_STOP_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from vspw_ray.errors import UserError

    parser = build_parser()
    # overrides may follow options (`train EXP.yaml --variant v train.lr=1e-4`): argparse leaves
    # such late positionals over, so collect the key=value ones for commands that take them
    args, extra = parser.parse_known_args(argv)
    late = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in late) or ' '.join(late)}")
    if late:
        args.overrides = list(args.overrides) + late
    if getattr(args, "no_dashboard", False):
        from vspw_ray.runtime import DASHBOARD_ENV

        os.environ[DASHBOARD_ENV] = "0"
    from vspw_ray.runtime import stop_on_sigterm

    stop_on_sigterm()
    # `kill -USR2 <pid>` prints every thread's stack to stderr (the job's logs): where a
    # command waits, without stopping it
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: completed writes stay, partial ones never count
        print(STOPPED, file=sys.stderr, flush=True)
        return _stopped_exit(130)
    except BrokenPipeError:  # `vspw-ray config show ... | head`: the reader is gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
