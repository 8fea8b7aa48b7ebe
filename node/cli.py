"""The ``i3node`` command line.

This is the outermost edge: it parses arguments, sets up logging, prints to the
terminal, and hands over to :mod:`node.app` (the composition root) or to library
functions.  Exit codes: 0 success, 1 the work failed, 2 bad usage or configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import faulthandler
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from node.settings import Settings, SettingsError, load_settings, redacted_url

__all__ = ["main", "parse_peer"]

log = logging.getLogger(__name__)

_PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>[0-9]{1,5})$")


class UsageError(Exception):
    """Bad command-line input; the message says what is wrong."""


def parse_peer(text: str) -> tuple[str, str, int]:
    """Parse ``AE@HOST:PORT`` into its parts.

    Raises
    ------
    UsageError
        When the text is not of that form.
    """
    m = _PEER_RE.match(text)
    if not m or not 0 < int(m["port"]) < 65536:
        raise UsageError(f"peer {text!r} is not of the form AE@HOST:PORT (e.g. I3NODE@127.0.0.1:11112)")
    return m["ae"], m["host"], int(m["port"])


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; one ``<N>``-prefixed line per record when stderr is the journal.

    See :func:`node.logs.setup_logging` (third-party noise kept at WARNING).
    """
    from node import logs

    logs.setup_logging(level)


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
        elif done >= total or done % max(1, total // 10) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


# -- configuration errors found while starting ----------------------------------------

#: SQLAlchemy backend -> (driver, extra of the ``i3node`` package that installs it).
_DRIVER_EXTRAS = {"postgresql": ("psycopg", "postgres")}


def check_database_driver(url: str) -> None:
    """Check that SQLAlchemy knows the URL's dialect and its driver module is installed.

    Parameters
    ----------
    url : str
        SQLAlchemy URL of the state database.

    Raises
    ------
    SettingsError
        Naming ``storage.database_url`` (password hidden): the URL is malformed, the
        dialect is unknown or the driver is not installed (with the pip command).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise SettingsError("storage.database_url: not a valid SQLAlchemy URL "
                            "(e.g. postgresql+psycopg://user@host:5432/db)") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise SettingsError(f"storage.database_url: {shown}: unknown database dialect "
                            f"{parsed.drivername!r}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = getattr(exc, "name", None) or parsed.get_driver_name()
        backend = parsed.get_backend_name()
        ours, extra = _DRIVER_EXTRAS.get(backend, ("", ""))
        if ours and parsed.get_driver_name() == ours:
            hint = f"pip install 'i3node[{extra}]'"
        elif ours:
            hint = f"install {driver!r}, or use {backend}+{ours}:// and pip install 'i3node[{extra}]'"
        else:
            hint = f"install the Python package {driver!r}"
        raise SettingsError(f"storage.database_url: {shown}: database driver {driver!r} is not installed "
                            f"({hint})") from None


def _database_failure(url: str, exc: BaseException) -> SettingsError:
    """A one-line :class:`SettingsError` for a database that cannot be reached or refuses us."""
    from sqlalchemy.engine import make_url

    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    what = lines[0] if lines else type(orig).__name__
    try:
        password = make_url(url).password
    except Exception:  # an unparsable URL never got this far
        password = None
    if password:
        what = what.replace(str(password), "***")
    return SettingsError(f"storage.database_url: cannot use the database {redacted_url(url)}: {what}")


_BIND_ERRNOS = {errno.EADDRINUSE: "is already in use", errno.EADDRNOTAVAIL: "is not an address of this host",
                errno.EACCES: "needs privileges to bind (ports below 1024)"}


def _bind_failure(exc: OSError, settings: Settings, scp_running: bool) -> SettingsError | None:
    """A :class:`SettingsError` for a listening socket that could not be bound, else ``None``.

    The DICOM listener binds first, the metrics endpoint after it, so `scp_running` tells
    which one failed. File errors (they carry a file name) are not bind errors.
    """
    if exc.errno not in _BIND_ERRNOS or exc.filename is not None:
        return None
    if scp_running:
        section, host, port = "metrics", settings.metrics.host, settings.metrics.port
    else:
        section, host, port = "dicom", settings.dicom.host, settings.dicom.port
    key = f"{section}.host" if exc.errno == errno.EADDRNOTAVAIL else f"{section}.port"
    return SettingsError(f"{key}: cannot listen on {host}:{port}: it {_BIND_ERRNOS[exc.errno]}")


@contextlib.contextmanager
def startup_errors(settings: Settings, scp_running: Any = None) -> Iterator[None]:
    """Turn the configuration errors found while building or starting the node into one-liners.

    Parameters
    ----------
    settings : Settings
        The node's settings (for the keys and the database URL).
    scp_running : callable, optional
        ``scp_running() -> bool``: whether the DICOM listener is up (to tell its bind
        error from the metrics endpoint's).

    Raises
    ------
    SettingsError
        For a port in use, an address not of this host, an unreachable database or one
        refusing the credentials (``storage.database_url``, password never shown): an
        :class:`sqlalchemy.exc.OperationalError` raised while *connecting* (SQLAlchemy
        wraps those with no SQL statement); errors of SQL statements pass unchanged.
        TLS file errors (:class:`node.tls.TlsConfigError`) already are SettingsErrors.
    """
    from sqlalchemy.exc import NoSuchModuleError, OperationalError

    url = settings.database_url
    try:
        yield
    except NoSuchModuleError:
        raise SettingsError(f"storage.database_url: {redacted_url(url)}: unknown database dialect") from None
    except OperationalError as exc:
        if exc.statement is not None:  # failed while executing SQL, not while connecting: a bug
            raise
        raise _database_failure(url, exc) from None
    except OSError as exc:
        failure = _bind_failure(exc, settings, bool(scp_running()) if scp_running is not None else False)
        if failure is None:
            raise
        raise failure from None


# -- commands ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM/SIGINT."""
    from node.app import build_app

    settings = _settings(args)
    setup_logging(settings.node.log_level)
    check_database_driver(settings.database_url)
    with startup_errors(settings):
        app = build_app(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping (no new associations; running work finishes)", signal.Signals(signum).name)
        app.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what a hung node is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        with startup_errors(settings, lambda: app.scp.is_running):
            app.serve_forever()
    except SettingsError:
        _close_quietly(app)
        raise
    log.info("stopped")
    return 0


def _close_quietly(app: Any) -> None:
    """Release what a node that failed to start holds (listener, database, audit file)."""
    for close in (app.scp.stop, app.stop):
        try:
            close()
        except Exception:  # already failing with a clearer message
            log.debug("cleanup after a failed start", exc_info=True)


#: What TLS error messages of ``send`` / ``echo`` call the files (options, not settings keys).
_TLS_OPTION_NAMES = {"tls.ca_file": "--ca-file", "tls.certificate": "--certificate", "tls.private_key": "--private-key"}


def _client_tls(args: argparse.Namespace) -> Any:
    """The client TLS context of ``send`` / ``echo`` (``None`` without ``--tls``).

    Raises
    ------
    UsageError
        TLS options without ``--tls``, ``--tls`` without ``--ca-file``, or a file that is
        missing, unreadable or invalid (named by its option).
    """
    from node.tls import TlsConfigError, client_context

    files = {"--ca-file": args.ca_file, "--certificate": args.certificate, "--private-key": args.private_key}
    if not args.tls:
        given = [opt for opt, value in files.items() if value]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --tls")
        return None
    if not args.ca_file:
        raise UsageError("--tls needs --ca-file (PEM file of the CA that signed the peer's certificate)")
    try:
        ctx = client_context(args.ca_file, args.certificate, args.private_key, names=_TLS_OPTION_NAMES)
    except TlsConfigError as exc:
        raise UsageError(str(exc)) from None
    # Its failures are explained by _tls_failure (one line); pynetdicom would log a traceback.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    return ctx


def _tls_failure(host: str, port: int, ctx: Any, timeout: float = 10.0) -> str | None:
    """Why a TLS connection to ``host:port`` fails, or ``None`` when it works.

    Run after an association failed, to explain it: connects, completes the handshake and
    waits up to a second for an alert (with TLS 1.3 a server refusing our certificate
    says so after the client finished its side of the handshake).
    """
    import socket

    from dicom.pynetdicom_compat import describe_tls_failure

    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # not a TLS problem (refused, unreachable): the association error says so
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(1.0)
            try:
                if tls.recv(1) == b"":
                    return (f"TLS connection to {host}:{port} closed by the peer right after the handshake "
                            "(does it require a client certificate it trusts?)")
            except TimeoutError:
                pass  # the server waits for our A-ASSOCIATE-RQ: TLS is fine
            return None
    except (OSError, ValueError) as exc:
        why = describe_tls_failure(exc)
        if why.startswith("certificate verify failed"):
            why += " (is --ca-file the CA that signed the peer's certificate?)"
        elif why == "no client certificate":
            why = "the peer requires a client certificate (--certificate and --private-key)"
        elif why.startswith("the peer does not trust this node's certificate"):
            why = "the peer does not trust our --certificate (unknown CA)"
        return f"TLS handshake with {host}:{port} failed: {why}"
    return None


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files or folders to a peer."""
    from dicom.scu import AssociationFailed, send_paths

    ae, host, port = parse_peer(args.to)
    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
    ctx = _client_tls(args)
    try:
        report = send_paths(
            paths, ae_title=ae, host=host, port=port, calling_ae=args.calling_ae, progress=_Progress("sending"),
            ssl_context=ctx,
        )
    except AssociationFailed as exc:
        tls_why = _tls_failure(host, port, ctx) if ctx is not None else None
        sys.stderr.write(f"error: {tls_why or exc}\n")
        return 1
    sys.stdout.write(
        f"sent {len(report.results)} file(s) to {args.to}: {report.n_success} success, "
        f"{report.n_warning} warning, {report.n_failure} failure\n"
    )
    for r in report.failures:
        status = "no status" if r.status is None else f"0x{r.status:04X}"
        sys.stdout.write(f"  FAILED {r.source} ({status}): {r.message}\n")
    return 0 if report.ok else 1


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer."""
    from dicom.scu import echo

    ae, host, port = parse_peer(args.to)
    ctx = _client_tls(args)
    ok = echo(ae, host, port, calling_ae=args.calling_ae, ssl_context=ctx)
    sys.stdout.write(f"C-ECHO {args.to}: {'success' if ok else 'FAILED'}\n")
    tls_why = _tls_failure(host, port, ctx) if ctx is not None and not ok else None
    if tls_why:
        sys.stderr.write(f"error: {tls_why}\n")
    return 0 if ok else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    """Show studies, series, jobs, corrected SEGs and undelivered outputs (newest first, bounded)."""
    from node.status import render_status, snapshot_of, status_json
    from node.store import JobState

    settings = _settings(args)
    for state in args.state or ():
        if state not in {s.value for s in JobState}:
            raise UsageError(f"--state {state}: not a job state ({', '.join(s.value for s in JobState)})")
    snap = snapshot_of(settings, limit=args.limit, job_states=tuple(args.state or ()), study_uid=args.study)
    sys.stdout.write((status_json(snap) if args.json else render_status(snap)) + "\n")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Bring a job's dead-lettered deliveries (or a failed job) back to pending."""
    from node.exporter import retry_dead
    from node.status import existing_store
    from node.store import JobState

    settings = _settings(args)
    store = existing_store(settings)
    try:
        job = store.job(args.job)
        if job is None:
            raise UsageError(f"job {args.job} does not exist (see i3node status)")
        n = retry_dead(store, args.job)
        requeued = False
        if job["state"] == JobState.FAILED.value:
            store.set_job_state(args.job, JobState.QUEUED, reason="retry requested by operator", attempts=0, not_before=0.0)
            requeued = True
    finally:
        store.close()
    sys.stdout.write(
        f"job {args.job}: {n} dead delivery(ies) back to pending"
        + ("; failed job queued again" if requeued else "")
        + " (a running node picks them up within seconds)\n"
    )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Purge old spooled inputs and delivered outputs per [retention] (never undelivered ones)."""
    from node.retention import dry_run, execute_purge, plan_purge
    from node.status import existing_store

    settings = _settings(args)
    r = settings.retention
    store = existing_store(settings)
    try:
        plan = plan_purge(store, time.time(), r.spool_days, r.outputs_days)
        sys.stdout.write(dry_run(plan) + "\n")
        if not args.dry_run:
            result = execute_purge(store, plan)
            sys.stdout.write(f"purged: {result}\n")
    finally:
        store.close()
    return 0


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 32x64x64 (slices x rows x columns)")
    return int(parts[0]), int(parts[1]), int(parts[2])


def cmd_make_study(args: argparse.Namespace) -> int:
    """Write a synthetic CT study with ground truth."""
    out = Path(args.out)
    from node.demo import write_synthetic_study

    paths, gt = write_synthetic_study(out, seed=args.seed, shape=args.shape, descending=args.descending)
    sys.stdout.write(
        f"wrote {len(paths)} CT instances to {out / 'dicom'} and ground truth to {gt}\n"
        f"send it with: i3node send {out / 'dicom'} --to I3NODE@127.0.0.1:11112\n"
    )
    return 0


def load_nifti_cases(images: Path, labels: Path) -> list[Any]:
    """Labelled training volumes from two folders of NIfTI files with matching names.

    Raises
    ------
    UsageError
        When a folder is missing or empty, a label file is missing, or shapes differ.
    """
    import SimpleITK as sitk

    from models.training import TrainingCase

    for d in (images, labels):
        if not d.is_dir():
            raise UsageError(f"{d}: not a folder")
    files = sorted(p for p in images.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise UsageError(f"{images}: no .nii or .nii.gz files")
    cases = []
    for f in files:
        lab = labels / f.name
        if not lab.is_file():
            raise UsageError(f"{lab}: label file for {f.name} is missing")
        img = sitk.ReadImage(str(f))
        seg = sitk.ReadImage(str(lab))
        arr, lab_arr = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(seg)
        if arr.shape != lab_arr.shape:
            raise UsageError(f"{f.name}: image shape {arr.shape} differs from label shape {lab_arr.shape}")
        sx, sy, sz = img.GetSpacing()
        cases.append(TrainingCase(image=arr.astype("float32"), labels=lab_arr.astype("uint8"), spacing=(sz, sy, sx)))
    return cases


def cmd_dataset_export(args: argparse.Namespace) -> int:
    """Write an nnU-Net raw dataset of the node's corrected studies (sparse labels, ``ignore`` elsewhere)."""
    from node.app import load_segments
    from node.dataset import ExportError, export_corrections
    from node.status import existing_store

    settings = _settings(args)
    setup_logging(settings.node.log_level)
    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since).replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            raise UsageError(f"--since {args.since!r}: expected a date like 2026-11-01 (UTC)") from None
    store = existing_store(settings)
    classes = ["background", *[s.label for s in sorted(load_segments(settings), key=lambda s: s.label_value)]]
    try:
        report = export_corrections(store, settings.outputs_dir, classes, Path(args.out), since=since,
                                    progress=_text_progress)
    except ExportError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        store.close()
    sys.stdout.write(f"{report.cases} corrected stud{'y' if report.cases == 1 else 'ies'} exported to {report.folder} "
                     f"({100 * report.annotated_fraction:.1f} % of voxels annotated, the rest 'ignore')\n")
    for why in report.skipped:
        sys.stdout.write(f"  left out: {why}\n")
    return 0


def _train_from(args: argparse.Namespace) -> int:
    """``i3node train preseg --from DIR ...``: a new, versioned ensemble from exported corrections."""
    from node.dataset import ExportError, train_from_exports

    t0 = time.monotonic()
    try:
        out = train_from_exports([Path(f) for f in args.from_], Path(args.out), folds=args.folds, epochs=args.epochs,
                                 iterations_per_epoch=args.iterations, progress=_text_progress)
    except ExportError as exc:
        raise UsageError(f"--from: {exc}") from None
    sys.stdout.write(f"trained in {time.monotonic() - t0:.0f} s; new presegmentation model: {out}\n"
                     f"The node keeps its current model: to use this one, set [models] preseg_dir = \"{out}\" "
                     "and restart the service.\n")
    return 0


def cmd_train_model(args: argparse.Namespace) -> int:
    """Train a presegmentation ensemble or a refinement model on NIfTI volumes."""
    setup_logging("INFO")
    if getattr(args, "from_", None):
        if args.images or args.labels:
            raise UsageError("--from and --images/--labels exclude each other")
        return _train_from(args)
    if not (args.images and args.labels):
        raise UsageError("--images and --labels are needed (or --from DIR for exported corrections)")
    cases = load_nifti_cases(Path(args.images), Path(args.labels))
    classes = tuple(args.classes.split(","))
    if len(classes) < 2 or classes[0] != "background":
        raise UsageError("--classes must start with 'background', e.g. background,organ,lesion")
    t0 = time.monotonic()
    if args.what == "preseg":
        from models.training import train_presegmentation

        out = train_presegmentation(
            cases, Path(args.out), folds=args.folds, epochs=args.epochs,
            iterations_per_epoch=args.iterations, class_names=classes, progress=_text_progress,
        )
    else:
        from models.refinement import Encoding
        from models.refinement_training import ReviewSimulation, train_refinement_model

        priors = None
        if args.preseg_dir:
            from models.demo import ensemble_priors

            _text_progress(f"presegmenting {len(cases)} case(s) with {args.preseg_dir} for the prior channels "
                           "(use cases the ensemble was not trained on: its priors are overconfident on those)")
            priors = ensemble_priors(Path(args.preseg_dir), cases, progress=_text_progress)
        out = train_refinement_model(
            cases, Path(args.out), priors=priors, encoding=Encoding(args.encoding), distance=not args.no_distance,
            simulation=ReviewSimulation(p_bad_prior=args.bad_prior if priors is not None else 0.0),
            epochs=args.epochs, iterations_per_epoch=args.iterations, class_names=classes, progress=_text_progress,
            plans_from=Path(args.preseg_dir) if args.preseg_dir else None,
        )
    sys.stdout.write(f"trained in {time.monotonic() - t0:.0f} s; nnU-Net results folder: {out}\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Build the demo models."""
    from models.demo import build_demo_models

    settings = _settings(args)
    setup_logging(settings.node.log_level)
    cache = Path(args.cache_dir) if args.cache_dir else settings.model_cache_dir
    t0 = time.monotonic()
    models = build_demo_models(cache, progress=_text_progress, force=args.force)
    sys.stdout.write(
        f"demo models ready in {time.monotonic() - t0:.0f} s\n"
        f"  presegmentation ensemble: {models.preseg_dir}\n"
        f"  refinement model:         {models.refine_dir}\n"
    )
    return 0


def _csv(kind: type, allowed: Sequence[Any] | None = None) -> Any:
    """argparse type: a comma-separated list of ``kind`` (each in ``allowed`` when given)."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            items = tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        bad = [i for i in items if allowed is not None and i not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, allowed or []))}")
        return items

    return parse


def _setting(text: str) -> Any:
    """argparse type of ``SELECTION:PLANES`` (e.g. ``i3deep:4``)."""
    from models.evaluation import SELECTIONS, Setting

    sel, _, planes = text.partition(":")
    if sel not in SELECTIONS or not planes.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not SELECTION:PLANES with SELECTION in {', '.join(SELECTIONS)}")
    return Setting(sel, int(planes))


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run the simulated radiologist over a labelled set (see :mod:`node.evaluate`)."""
    from models.refiners import resolve_method
    from node.app import model_tag
    from node.evaluate import EvaluationConfig, build_refiners, run_evaluation, write_report

    settings = _settings(args)
    setup_logging(settings.node.log_level)
    logging.getLogger("models").setLevel(logging.WARNING)
    if not args.data and args.seed in (11, 13):
        raise UsageError(f"--seed {args.seed} is a demo training seed; evaluation needs held-out phantoms")
    if args.data and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    if args.cases < 1:
        raise UsageError("--cases must be at least 1")
    t0 = time.monotonic()
    preseg_dir, refine_dir, ensemble, refine_model = _evaluation_models(args, settings)
    class_names = ensemble.class_names
    if args.missed and args.missed not in class_names[1:]:
        raise UsageError(f"--missed {args.missed!r}: not a class of the ensemble ({', '.join(class_names[1:])})")
    node_method, why = resolve_method(settings.refinement.method, have_model=refine_model is not None,
                                      have_ensemble=True)
    raw, source = _evaluation_cases(args)
    config = EvaluationConfig(selections=args.selections, planes=args.planes, refiners=args.refiners,
                              configured=args.configured, configured_only=args.configured_only,
                              min_dist=args.min_dist, min_uncert=settings.acquisition.min_uncert)
    refiners = build_refiners(config.refiners, ensemble=ensemble, refine_model=refine_model,
                              model_version=model_tag(Path(refine_dir)) if refine_dir else "",
                              gamma=settings.refinement.gamma, tta_steps=settings.refinement.tta_steps,
                              tta_lr=settings.refinement.tta_lr)
    _text_progress(f"evaluating {len(refiners)} refiner(s) on {len(raw)} case(s) x {len(config.settings())} "
                   f"setting(s); the node delivers {node_method}{' (' + why + ')' if why else ''}")
    result = run_evaluation(raw, ensemble, refiners, config, class_names=class_names, missed=args.missed,
                            progress=_text_progress)
    meta = {"cases": len(raw), "source": source, "preseg_dir": preseg_dir, "refine_dir": refine_dir,
            "node_method": node_method, "seconds": time.monotonic() - t0,
            "configured": f"{config.configured.selection}:{config.configured.planes}",
            "gamma": settings.refinement.gamma, "tta_steps": settings.refinement.tta_steps}
    paths = write_report(result, Path(args.out), meta=meta, config=config)
    sys.stdout.write(paths["markdown"].read_text())
    sys.stdout.write("\nwrote " + ", ".join(str(p) for p in paths.values()) + "\n")
    return 0


def _evaluation_models(args: argparse.Namespace, settings: Settings) -> tuple[str, str, Any, Any]:
    """Model folders (default: the demo models, built if missing), the ensemble and the refinement model."""
    from models.nnunet import EnsemblePredictor, ModelError
    from models.refinement import RefinementModel, RefinementModelError

    device = None if settings.models.device == "auto" else settings.models.device
    preseg_dir, refine_dir = args.preseg_dir, args.refine_dir
    if not preseg_dir:
        from models.demo import build_demo_models

        demo = build_demo_models(settings.model_cache_dir, progress=_text_progress)
        preseg_dir = str(demo.preseg_dir)
        refine_dir = refine_dir or (str(demo.refine_dir) if demo.refine_dir else "")
    try:
        ensemble = EnsemblePredictor(Path(preseg_dir), device=device)
    except (ModelError, ValueError) as exc:
        raise UsageError(f"--preseg-dir: {exc}") from None
    refine_model = None
    if refine_dir:
        try:
            refine_model = RefinementModel(Path(refine_dir), device=device)
            refine_model.load()
        except (RefinementModelError, ValueError) as exc:
            raise UsageError(f"--refine-dir: {exc}") from None
    return preseg_dir, refine_dir, ensemble, refine_model


def _evaluation_cases(args: argparse.Namespace) -> tuple[list[Any], str]:
    """The labelled cases (``--data`` or held-out phantoms) and how the report names them."""
    from node.evaluate import folder_cases, phantom_cases

    if args.data:
        try:
            raw = list(folder_cases(Path(args.data)))[: args.cases]
        except ValueError as exc:
            raise UsageError(f"--data: {exc}") from None
        source = f"labelled volumes in {args.data}"
    else:
        raw = list(phantom_cases(args.cases, args.shape, args.seed))
        source = f"phantoms {'x'.join(map(str, args.shape))}, base seed {args.seed}"
    if args.missed:
        source += f"; the ensemble's {args.missed} removed (stress test)"
    return raw, source


def _text_progress(message: Any, *rest: Any) -> None:
    """Progress lines on stderr: plain messages or model-training events."""
    if hasattr(message, "stage") and hasattr(message, "message"):
        pct = f" {message.fraction * 100:3.0f}%" if getattr(message, "fraction", None) is not None else ""
        line = f"[{message.stage}{pct}] {message.message}"
    else:
        line = f"[i3node] {message}{' ' + ' '.join(map(str, rest)) if rest else ''}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``i3node`` command."""
    p = argparse.ArgumentParser(prog="i3node", description="i3Deep DICOM node: presegment, ask for the few slices that matter, refine.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the node (systemd runs this)")
    s.add_argument("--config", help="TOML settings file (default: embedded loopback defaults)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    s.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    s.add_argument("--to", required=True, help="AE@HOST:PORT of the receiver")
    s.add_argument("--calling-ae", default="I3NODE_SEND", help="our AE title (default I3NODE_SEND)")
    _add_tls_options(s)
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    s.add_argument("--to", required=True, help="AE@HOST:PORT")
    s.add_argument("--calling-ae", default="I3NODE_SEND")
    _add_tls_options(s)
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("status", help="studies, series and jobs")
    s.add_argument("--config")
    s.add_argument("--json", action="store_true", help="one JSON document (ISO 8601 times, UTC)")
    s.add_argument("--limit", type=_positive_int, default=50, help="at most this many rows of each kind (default 50)")
    s.add_argument("--state", action="append", metavar="STATE", help="only jobs in this state (repeatable)")
    s.add_argument("--study", metavar="UID", help="only this study")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("retry", help="retry a job's dead-lettered deliveries, or a failed job")
    s.add_argument("job", type=int, help="job id (see i3node status)")
    s.add_argument("--config")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("purge", help="delete old inputs and delivered outputs per [retention]")
    s.add_argument("--config")
    s.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("make-study", help="write a synthetic CT study with ground truth")
    s.add_argument("out", help="output folder")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--shape", type=_shape, default=(32, 64, 64), help="slices x rows x columns (default 32x64x64)")
    s.add_argument("--descending", action="store_true", help="instance order against the slice normal")
    s.set_defaults(func=cmd_make_study)

    _add_train_parsers(sub)
    _add_dataset_parser(sub)
    _add_evaluate_parser(sub)

    s = sub.add_parser("demo", help="the whole i3Deep loop on loopback with tiny models")
    s.add_argument("--size", type=_shape, default=None, help="study size, slices x rows x columns")
    s.add_argument("--workdir", default="var/demo", help="folder for the demo's state and report")
    s.add_argument("--keep", action="store_true", help="keep the workdir of a previous run")
    s.set_defaults(func=cmd_demo)
    return p



def _add_tls_options(s: argparse.ArgumentParser) -> None:
    """``--tls`` and its files (``send``, ``echo``)."""
    g = s.add_argument_group("DICOM TLS (TLS 1.2 or later; the peer's certificate is verified)")
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--ca-file", help="PEM CA bundle that signed the peer's certificate (required with --tls)")
    g.add_argument("--certificate", help="our PEM client certificate, for peers that require one")
    g.add_argument("--private-key", help="PEM private key of --certificate (unencrypted)")


def _add_train_parsers(sub: Any) -> None:
    """``i3node train demo-models | preseg | refine``."""
    s = sub.add_parser("train", help="train models")
    tsub = s.add_subparsers(dest="what", required=True, metavar="WHAT")
    t = tsub.add_parser("demo-models", help="tiny presegmentation ensemble + refinement model on synthetic phantoms")
    t.add_argument("--config")
    t.add_argument("--cache-dir", help="where to build (default: models.cache_dir)")
    t.add_argument("--force", action="store_true", help="rebuild even if cached")
    t.set_defaults(func=cmd_train)
    for what, helptext in (("preseg", "presegmentation ensemble (one nnU-Net fold per member)"),
                           ("refine", "refinement model fed with simulated corrections")):
        t = tsub.add_parser(what, help=f"{helptext} from NIfTI images and labels")
        t.add_argument("--images", help="folder of images (.nii/.nii.gz)")
        t.add_argument("--labels", help="folder of label maps with the same file names")
        t.add_argument("--out", required=True, help="work folder (gets nnUNet_raw/_preprocessed/_results); "
                       "with --from, the folder that gets a new preseg-<time> model folder")
        t.add_argument("--classes", default="background,organ,lesion", help="class names, background first")
        t.add_argument("--epochs", type=int, default=50)
        t.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
        if what == "preseg":
            t.add_argument("--folds", type=int, default=5, help="ensemble members (nnU-Net folds)")
            t.add_argument("--from", dest="from_", action="append", metavar="DIR",
                           help="an 'i3node dataset export' folder (repeatable): sparse expert labels, ignore elsewhere")
        else:
            t.add_argument("--encoding", choices=("i3deep", "i3deep+reviewed"), default="i3deep+reviewed")
            t.add_argument("--preseg-dir", default="",
                           help="presegmentation results folder: its mean probabilities become prior channels")
            t.add_argument("--bad-prior", type=float, default=0.3,
                           help="share of samples whose prior is damaged in training (default 0.3)")
            t.add_argument("--no-distance", action="store_true", help="leave out the distance channels")
        t.set_defaults(func=cmd_train_model)


def _add_dataset_parser(sub: Any) -> None:
    """``i3node dataset export``."""
    s = sub.add_parser("dataset", help="training sets from the radiologists' corrections")
    dsub = s.add_subparsers(dest="what", required=True, metavar="WHAT")
    t = dsub.add_parser("export", help="nnU-Net raw dataset of the corrected studies (expert labels on the "
                        "reviewed planes, 'ignore' elsewhere)")
    t.add_argument("--config")
    t.add_argument("--out", required=True, help="dataset folder to write (imagesTr/, labelsTr/, dataset.json)")
    t.add_argument("--since", help="only studies corrected on or after this date (UTC), e.g. 2026-11-01")
    t.set_defaults(func=cmd_dataset_export)


def _add_evaluate_parser(sub: Any) -> None:
    """``i3node evaluate``: the simulated radiologist."""
    from models.evaluation import SELECTIONS, Setting
    from models.refiners import METHODS

    s = sub.add_parser("evaluate", help="simulated radiologist: Dice of every refiner after one correction round")
    s.add_argument("--config", help="settings file (refinement gamma and TTA schedule, device)")
    s.add_argument("--cases", type=int, default=8, help="number of cases (phantoms, or at most N of --data)")
    s.add_argument("--shape", type=_shape, default=(32, 64, 64), help="phantom size, slices x rows x columns")
    s.add_argument("--seed", type=int, default=77, help="phantom base seed (not 11 or 13: the demo training seeds)")
    s.add_argument("--data", help="nnU-Net raw dataset (imagesTr/labelsTr) or images/ + labels/ NIfTI folders")
    s.add_argument("--preseg-dir", default="", help="presegmentation results folder (default: the demo models)")
    s.add_argument("--refine-dir", default="", help="refinement results folder (default: the demo models')")
    s.add_argument("--selections", type=_csv(str, SELECTIONS), default=SELECTIONS, help="comma-separated")
    s.add_argument("--planes", type=_csv(int), default=(1, 2, 4, 8), help="planes per orientation, comma-separated")
    s.add_argument("--refiners", type=_csv(str, METHODS), default=METHODS, help="comma-separated")
    s.add_argument("--configured", type=_setting, default=Setting("i3deep", 4),
                   help="the node's setting SELECTION:PLANES (default i3deep:4); slow refiners run only there")
    s.add_argument("--configured-only", type=_csv(str, METHODS), default=("tta",),
                   help="refiners evaluated at --configured only (default tta)")
    s.add_argument("--min-dist", type=float, default=0.1, help="i3Deep minDist of the selection (default 0.1)")
    s.add_argument("--missed", default="", help="stress test: remove this class from the ensemble's output")
    s.add_argument("--out", default="var/evaluate", help="report folder")
    s.set_defaults(func=cmd_evaluate)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (see :mod:`node.demo`)."""
    from node.demo import run_demo

    setup_logging("INFO")
    logging.getLogger("models").setLevel(logging.WARNING)  # training progress is printed by the callback
    report = run_demo(Path(args.workdir), size=args.size, keep=args.keep, progress=_text_progress)
    if report.settings is not None:
        # What `i3node status` shows for the demo node's state (studies, series, jobs).
        from node.status import render_status, snapshot_of

        status = render_status(snapshot_of(report.settings))
        sys.stdout.write("\n$ i3node status\n" + status + "\n")
    sys.stdout.write(report.render() + "\n")
    return 0 if report.ok else 1


def _one_line(text: str) -> str:
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _err_prefix() -> str:
    """``<3>`` (error priority) when stderr is the journal, so the line is logged as an error."""
    from node.logs import stderr_is_journal

    return "<3>" if stderr_is_journal() else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``i3node`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        sys.stderr.write(f"{_err_prefix()}i3node: configuration error: {_one_line(str(exc))}\n")
        return 2
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: logged, so that in the journal the traceback is one entry
        log.critical("i3node %s failed with an unexpected error", args.command, exc_info=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
