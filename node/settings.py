"""Node settings: a TOML file mapped onto frozen dataclasses.

Every key is validated when the node starts.  Unknown keys, wrong types and values
outside their allowed range are rejected with a :class:`SettingsError` that names the
key (``dicom.port``) and says what is allowed.  Missing keys take the embedded
defaults, which run the node on loopback with its state under ``./var``.

The file is read once, by :func:`load_settings`; nothing reads the environment at
import time.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SettingsError",
    "Settings",
    "NodeSettings",
    "DicomSettings",
    "StorageSettings",
    "StudySettings",
    "SelectionRule",
    "ModelSettings",
    "AcquisitionSettings",
    "AdviceSettings",
    "RefinementSettings",
    "OutputSettings",
    "Destination",
    "DeliverySettings",
    "TlsSettings",
    "AuditSettings",
    "MetricsSettings",
    "RetentionSettings",
    "load_settings",
    "settings_from_mapping",
    "default_settings",
    "resolve_database_url",
    "redacted_url",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
_UID_ROOT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SettingsError(ValueError):
    """A settings file is unreadable or a key has a wrong type or value.

    The message always starts with the dotted key that is wrong.
    """


def _meta(
    doc: str,
    *,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: re.Pattern[str] | None = None,
    pattern_doc: str = "",
) -> dict[str, Any]:
    return {
        "doc": doc,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "pattern": pattern,
        "pattern_doc": pattern_doc,
    }


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with documentation and validation metadata."""
    return field(default=default, metadata=_meta(doc, **kw))


@dataclass(frozen=True)
class NodeSettings:
    """General node behaviour."""

    state_dir: Path = _f(Path("var"), "Directory for spool, outputs, database and logs; relative paths are resolved against the working directory.")
    log_level: str = _f("INFO", "Log level of the node's own loggers.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    name: str = _f("", "Name of this node, unique among the nodes that share a database: the owner of the work it claims, shown in status, events and metrics. Empty = the host name.", pattern=re.compile(r"^[A-Za-z0-9._@:-]{0,64}$"), pattern_doc="up to 64 letters, digits and ._@:-")
    lease_s: float = _f(60.0, "Lease on claimed work (jobs, corrections, deliveries), renewed every third of it while the work runs; when a node dies, another takes its work over once the lease has run out.", minimum=5, maximum=3600)
    stop_timeout_s: float = _f(60.0, "On SIGTERM, how long a running job may take to finish before it is handed back to the queue (keep below systemd's TimeoutStopSec).", minimum=0, maximum=3600)
    job_workers: int = _f(1, "Model jobs run at once on this node (one per GPU); 0 = receive and deliver only, for a node that shares its database with nodes that run the models.", minimum=0, maximum=1)


@dataclass(frozen=True)
class DicomSettings:
    """The inbound DICOM service (C-STORE / C-ECHO SCP)."""

    ae_title: str = _f("I3NODE", "AE title the node answers to.", pattern=_AE_RE, pattern_doc="1-16 printable characters, no backslash")
    host: str = _f("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = _f(11112, "TCP port to listen on (0 = any free port, for tests).", minimum=0, maximum=65535)
    allowed_callers: tuple[str, ...] = _f(
        ("*@127.0.0.1",),
        "Calling AE allow-list. Entries are 'AE', 'AE@host' or '*@host'; a single '*' accepts any caller.",
    )
    max_associations: int = _f(10, "Maximum number of concurrent associations.", minimum=1, maximum=1000)
    acse_timeout_s: float = _f(30.0, "Deadline of association setup (TLS handshake and A-ASSOCIATE) in seconds.", minimum=1, maximum=3600)
    dimse_timeout_s: float = _f(60.0, "DIMSE message timeout in seconds.", minimum=1, maximum=3600)
    network_timeout_s: float = _f(60.0, "Idle network timeout in seconds; also the deadline of every read once an association is set up.", minimum=1, maximum=3600)
    min_free_mb: int = _f(1024, "Free-disk reserve of the spool in MiB; below it C-STORE answers A700 (out of resources).", minimum=0)
    max_pdu_kb: int = _f(1024, "Maximum PDU length the node advertises and accepts, in KiB; a peer announcing a longer PDU is aborted before it is buffered.", minimum=4, maximum=262144)
    max_dataset_mb: int = _f(1024, "Largest data set accepted, in MiB (also the inflation cap of deflated data sets); memory per association stays below it.", minimum=1, maximum=65536)
    tls: bool = _f(False, "Require DICOM TLS on the listening port (see [tls]).")
    fast_store: bool = _f(True, "Receive C-STORE below pynetdicom's DIMSE layer (same statuses and files, a fraction of the CPU per instance); false = stock pynetdicom, the fallback if a pynetdicom upgrade misbehaves.")
    low_latency: bool = _f(True, "Event-driven message dispatch and whole-PDU reads on each association (pynetdicom polls every 1 ms otherwise); false = stock pynetdicom.")


@dataclass(frozen=True)
class StorageSettings:
    """Where received instances, outputs and state live."""

    spool_dir: str = _f("", "Received instances; empty = <state_dir>/spool.")
    outputs_dir: str = _f("", "Objects the node creates, kept until delivered; empty = <state_dir>/outputs.")
    database_url: str = _f("", "SQLAlchemy URL of the state database; empty = SQLite in <state_dir>/i3node.db. PostgreSQL: postgresql+psycopg://user@host:5432/db (needs the postgres extra); put the password in database_password_file or I3NODE_DATABASE_PASSWORD, not in the URL.")
    database_password_file: str = _f("", "File holding the database password (one line; readable by the service user only). The environment variable I3NODE_DATABASE_PASSWORD is used when this is empty.")


@dataclass(frozen=True)
class StudySettings:
    """When a study counts as complete."""

    stable_after_s: float = _f(30.0, "A study with no new instance for this many seconds is complete.", minimum=0, maximum=86400)
    sweep_interval_s: float = _f(5.0, "How often the stable-study sweep runs, in seconds.", minimum=0.1, maximum=3600)


@dataclass(frozen=True)
class SelectionRule:
    """Which series of a complete study get a segmentation job.

    A series gets a job when it matches any rule.
    """

    modalities: tuple[str, ...] = _f(("CT", "MR"), "Modalities accepted by this rule.")
    min_slices: int = _f(16, "Minimum number of instances in the series.", minimum=1)
    description_pattern: str = _f("", "Optional regular expression that SeriesDescription must match (search, case-insensitive).")


@dataclass(frozen=True)
class ModelSettings:
    """The nnU-Net models."""

    preseg_dir: str = _f("", "nnU-Net v2 results folder of the presegmentation ensemble (Trainer__Plans__config with fold_*); empty = the demo models.")
    refine_dir: str = _f("", "nnU-Net v2 results folder of the refinement model; empty = the demo model when preseg_dir is empty too, else none (see refinement.method for the fallback).")
    cache_dir: str = _f(".cache/demo-models", "Where demo models are built and cached.")
    device: str = _f("auto", "Inference device: auto, cpu, cuda or cuda:N.", pattern=re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$"), pattern_doc="auto, cpu, cuda or cuda:N")
    tta: bool = _f(False, "Add mirroring test-time-augmentation members to the ensemble.")
    model_id: str = _f("i3node-demo", "Algorithm name written into SEG objects.")


@dataclass(frozen=True)
class AcquisitionSettings:
    """Uncertainty and slice selection (i3Deep one-shot acquisition)."""

    strategy: str = _f("i3deep", "Slice selection strategy.", choices=("i3deep", "uss"))
    uncertainty: str = _f("entropy", "Voxel uncertainty measure.", choices=("entropy", "binary_fg"))
    min_dist: float = _f(0.0234, "Minimum distance between chosen slices, as a fraction of the slices along that axis.", minimum=0, maximum=1)
    min_uncert: float = _f(0.1, "Drop slices whose uncertainty is below this fraction of the most uncertain slice.", minimum=0, maximum=1)
    max_slices: int = _f(12, "Maximum slices per orientation (the paper's 12 is meant for clinical CT of hundreds of slices).", minimum=0, maximum=1000)
    annotation_ratio: float = _f(0.0, "Annotation budget that scales with the study: when > 0, ask for about this many slices per axial slice of the presegmentation's foreground extent, spread over the orientations (each at most max_slices, at least 1); 0 = max_slices per orientation.", minimum=0, maximum=3)
    axes: tuple[str, ...] = _f(("axial", "coronal", "sagittal"), "Orientations to pick slices in.")
    corrected_slices: str = _f("requested", "Which slices count as reviewed when a corrected SEG returns.", choices=("requested", "requested+changed"))


@dataclass(frozen=True)
class AdviceSettings:
    """Review regions: the least confident SLIC supervoxels, sent as a SEG series of their own (MECCA advice)."""

    enabled: bool = _f(True, "With each AI presegmentation, send the series 'AI review regions (research use)' and list the regions in the key-image note.")
    top_k: int = _f(5, "Number of review regions (the least confident supervoxels); 0 = none.", minimum=0, maximum=20)
    n_segments: int = _f(200, "Approximate number of SLIC supervoxels the volume is split into.", minimum=1, maximum=100000)


@dataclass(frozen=True)
class RefinementSettings:
    """How a corrected SEG becomes the refined SEG (the corrected slices always stay as drawn)."""

    method: str = _f("auto", "auto = the method i3node evaluate measured best (model+rw); model = the refinement nnU-Net; model+rw = random walker seeded with the corrected slices and pulled towards the refinement network; tta = test-time adaptation of the presegmentation ensemble; prior+rw, random_walker, watershed, graph_cut, paste = classical. Without a refinement model, model and model+rw fall back to tta; without an ensemble to prior+rw.", choices=("auto", "model+rw", "model", "tta", "prior+rw", "random_walker", "watershed", "graph_cut", "paste"))
    gamma: float = _f(0.03, "Weight of the network's (or the ensemble's) probabilities in model+rw and prior+rw (0 = plain random walker).", minimum=0, maximum=100)
    tta_steps: int = _f(20, "Optimisation steps per fold of test-time adaptation.", minimum=0, maximum=10000)
    tta_lr: float = _f(0.001, "Learning rate of test-time adaptation (Adam).", minimum=0, maximum=1)


@dataclass(frozen=True)
class OutputSettings:
    """Objects the node creates."""

    uid_root: str = _f("1.2.826.0.1.3680043.10.1234", "UID root for every UID the node creates.", pattern=_UID_ROOT_RE, pattern_doc="digits separated by dots")
    keep_empty_frames: bool = _f(True, "Write a SEG frame for every source slice, empty or not (widest viewer compatibility).")
    kos_title: str = _f("113000", "Code value (DCM, CID 7010) of the Key Object Selection title: 113000 Of Interest, 113004 For Teaching, 113008 For Peer Review, 113009 For Research.", choices=("113000", "113004", "113008", "113009"))
    series_number_base: int = _f(9000, "SeriesNumber of the first output series.", minimum=1)
    segments_file: str = _f("", "TOML file with segment labels and codes per class; empty = built-in defaults.")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the node sends its outputs to."""

    ae_title: str = _f("VIEWER", "AE title of the destination.", pattern=_AE_RE, pattern_doc="1-16 printable characters, no backslash")
    host: str = _f("127.0.0.1", "Host name or address of the destination.")
    port: int = _f(11113, "TCP port of the destination.", minimum=1, maximum=65535)
    tls: bool = _f(False, "Use DICOM TLS for this destination.")


@dataclass(frozen=True)
class DeliverySettings:
    """Retries of outbound C-STOREs."""

    max_attempts: int = _f(8, "Attempts before an output is dead-lettered.", minimum=1, maximum=1000)
    backoff_initial_s: float = _f(5.0, "First retry delay in seconds; doubles each attempt.", minimum=0, maximum=86400)
    backoff_max_s: float = _f(600.0, "Upper bound of the retry delay in seconds.", minimum=0, maximum=86400)
    calling_ae: str = _f("I3NODE", "Calling AE title used when sending.", pattern=_AE_RE, pattern_doc="1-16 printable characters, no backslash")


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (TLS 1.2 or later)."""

    certificate: str = _f("", "PEM certificate of this node.")
    private_key: str = _f("", "PEM private key of this node.")
    ca_file: str = _f("", "PEM CA bundle used to verify peers' certificates.")
    require_client_certificate: bool = _f(True, "Refuse inbound TLS clients without a certificate signed by ca_file.")


@dataclass(frozen=True)
class AuditSettings:
    """Append-only audit trail of security-relevant events."""

    enabled: bool = _f(True, "Write the audit trail.")
    path: str = _f("", "JSON-lines audit file; empty = <state_dir>/audit.jsonl.")


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics endpoint (/metrics) and health endpoint (/healthz)."""

    enabled: bool = _f(False, "Serve Prometheus metrics and the health endpoint over HTTP.")
    host: str = _f("127.0.0.1", "Address the metrics endpoint binds to (0.0.0.0 for every interface; the endpoint carries no patient data but has no authentication).")
    port: int = _f(9464, "Port of the metrics endpoint.", minimum=1, maximum=65535)


@dataclass(frozen=True)
class RetentionSettings:
    """Purging of old data (never before delivery)."""

    spool_days: float = _f(30.0, "Delete received instances of finished jobs after this many days (0 = keep forever).", minimum=0)
    outputs_days: float = _f(30.0, "Delete delivered outputs after this many days (0 = keep forever).", minimum=0)


@dataclass(frozen=True)
class Settings:
    """All node settings.  Build with :func:`load_settings` or :func:`settings_from_mapping`."""

    node: NodeSettings = field(default_factory=NodeSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    study: StudySettings = field(default_factory=StudySettings)
    selection: tuple[SelectionRule, ...] = field(default=(SelectionRule(),), metadata=_meta("Series selection rules ([[selection]] tables); a series matching any rule gets a job."))
    models: ModelSettings = field(default_factory=ModelSettings)
    acquisition: AcquisitionSettings = field(default_factory=AcquisitionSettings)
    advice: AdviceSettings = field(default_factory=AdviceSettings)
    refinement: RefinementSettings = field(default_factory=RefinementSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    destinations: tuple[Destination, ...] = field(default=(), metadata=_meta("Where outputs are sent ([[destinations]] tables)."))
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    base_dir: Path = field(default=Path("."), metadata=_meta("internal: directory relative paths are resolved against"))
    source: str = field(default="", metadata=_meta("internal: the settings file this came from ('' = embedded defaults)"))
    source_sha256: str = field(default="", metadata=_meta("internal: SHA-256 of the settings file"))

    # -- derived paths -------------------------------------------------
    @property
    def state_dir(self) -> Path:
        """Absolute state directory."""
        p = self.node.state_dir
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def _under_state(self, value: str, default: str) -> Path:
        if value:
            p = Path(value)
            return p if p.is_absolute() else (self.base_dir / p).resolve()
        return self.state_dir / default

    @property
    def spool_dir(self) -> Path:
        """Directory of received instances."""
        return self._under_state(self.storage.spool_dir, "spool")

    @property
    def outputs_dir(self) -> Path:
        """Directory of created objects awaiting or after delivery."""
        return self._under_state(self.storage.outputs_dir, "outputs")

    @property
    def audit_path(self) -> Path:
        """Audit trail file."""
        return self._under_state(self.audit.path, "audit.jsonl")

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the state database."""
        return self.storage.database_url or f"sqlite:///{self.state_dir / 'i3node.db'}"

    @property
    def node_id(self) -> str:
        """This node's name among the nodes sharing the database (``node.name`` or the host name)."""
        if self.node.name:
            return self.node.name
        import socket

        return socket.gethostname()[:64] or "i3node"

    @property
    def model_cache_dir(self) -> Path:
        """Cache folder of demo models."""
        p = Path(self.models.cache_dir)
        return p if p.is_absolute() else (self.base_dir / p).resolve()


_INTERNAL = {"base_dir", "source", "source_sha256"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path string"}.get(tp, str(tp))


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Convert a TOML value to the annotated type or raise SettingsError naming ``key``."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SettingsError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{key}: expected a non-empty path string, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # programming error


def _check(key: str, f: dataclasses.Field[Any], value: Any) -> None:
    md = f.metadata
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if md.get("choices") is not None and v not in md["choices"]:
            allowed = ", ".join(repr(c) for c in md["choices"])
            raise SettingsError(f"{key}: {v!r} is not allowed; choose one of {allowed}")
        if md.get("minimum") is not None and isinstance(v, (int, float)) and v < md["minimum"]:
            raise SettingsError(f"{key}: {v!r} is below the minimum {md['minimum']}")
        if md.get("maximum") is not None and isinstance(v, (int, float)) and v > md["maximum"]:
            raise SettingsError(f"{key}: {v!r} is above the maximum {md['maximum']}")
        if md.get("pattern") is not None and isinstance(v, str) and not md["pattern"].fullmatch(v):
            raise SettingsError(f"{key}: {v!r} is not valid; expected {md['pattern_doc']}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else k
            allowed = ", ".join(sorted(fields))
            raise SettingsError(f"{where}: unknown key; allowed keys here: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            value = _convert(key, hints[name], data[name])
            _check(key, f, value)
            kwargs[name] = value
    return cls(**kwargs)


def _validate_cross(s: Settings) -> None:
    for i, entry in enumerate(s.dicom.allowed_callers):
        ae, _, host = entry.partition("@")
        if not ae or (ae != "*" and not _AE_RE.fullmatch(ae)) or ("@" in entry and not host):
            raise SettingsError(
                f"dicom.allowed_callers[{i}]: {entry!r} is not valid; expected 'AE', 'AE@host', '*@host' or '*'"
            )
    for i, rule in enumerate(s.selection):
        if rule.description_pattern:
            try:
                re.compile(rule.description_pattern)
            except re.error as exc:
                raise SettingsError(f"selection[{i}].description_pattern: not a valid regular expression ({exc})") from None
        for j, m in enumerate(rule.modalities):
            if m not in ("CT", "MR"):
                raise SettingsError(f"selection[{i}].modalities[{j}]: {m!r} is not supported; choose CT or MR")
    for i, ax in enumerate(s.acquisition.axes):
        if ax not in ("axial", "coronal", "sagittal"):
            raise SettingsError(f"acquisition.axes[{i}]: {ax!r} is not allowed; choose axial, coronal or sagittal")
    if len(set(s.acquisition.axes)) != len(s.acquisition.axes):
        raise SettingsError("acquisition.axes: orientations must not repeat")
    if s.delivery.backoff_max_s < s.delivery.backoff_initial_s:
        raise SettingsError("delivery.backoff_max_s: must be at least delivery.backoff_initial_s")
    needs_tls = s.dicom.tls or any(d.tls for d in s.destinations)
    if needs_tls:
        for k in ("certificate", "private_key", "ca_file"):
            if not getattr(s.tls, k):
                raise SettingsError(f"tls.{k}: required because TLS is enabled (dicom.tls or a destination's tls)")
    names = [d.ae_title for d in s.destinations]
    if len(set(names)) != len(names):
        raise SettingsError("destinations: AE titles must be unique")


def settings_from_mapping(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Settings:
    """Validate a parsed TOML document and build :class:`Settings`.

    Parameters
    ----------
    data
        The parsed document (as from :func:`tomllib.load`).
    base_dir
        Directory that relative paths are resolved against (default: working directory).

    Raises
    ------
    SettingsError
        Naming the first wrong key and what is allowed.
    """
    s = _build(Settings, data, "")
    s = dataclasses.replace(s, base_dir=(base_dir or Path.cwd()).resolve())
    _validate_cross(s)
    return s


def load_settings(path: Path | str | None) -> Settings:
    """Read and validate a TOML settings file; ``None`` gives the embedded defaults.

    Relative paths in the file are resolved against the working directory, as a
    systemd unit's ``WorkingDirectory`` or the shell would.
    """
    if path is None:
        return default_settings()
    import hashlib

    p = Path(path)
    try:
        raw = p.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{p}: settings file not found") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{p}: not valid TOML ({exc})") from None
    s = settings_from_mapping(data)
    return dataclasses.replace(s, source=str(p.resolve()), source_sha256=hashlib.sha256(raw).hexdigest())


def default_settings(**overrides: Any) -> Settings:
    """Embedded defaults (loopback, SQLite under ./var), optionally with section overrides."""
    return settings_from_mapping(overrides)


def resolve_database_url(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The state database URL with its password from ``storage.database_password_file`` or
    ``I3NODE_DATABASE_PASSWORD`` (a password inside the URL is used as it is).

    Raises
    ------
    SettingsError
        When the password file cannot be read (naming the key).
    """
    import os

    import sqlalchemy as sa

    env = os.environ if environ is None else environ
    url = settings.database_url
    password = None
    f = settings.storage.database_password_file
    if f:
        try:
            password = Path(f).read_text().strip("\r\n")
        except OSError as exc:
            raise SettingsError(f"storage.database_password_file: cannot read {f}: {exc.strerror}") from None
    elif env.get("I3NODE_DATABASE_PASSWORD"):
        password = env["I3NODE_DATABASE_PASSWORD"]
    if password is None or url.startswith("sqlite"):
        return url
    parsed = sa.engine.make_url(url)
    if parsed.password:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


def redacted_url(url: str) -> str:
    """A database URL safe to show (password replaced by ``***``)."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown without anything after the scheme
        return url.split("://", 1)[0] + "://(unparsable)"


def iter_keys(cls: type = Settings, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """Yield ``(dotted key, type name, default, doc)`` for every setting (config reference)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _INTERNAL:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key)
            continue
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from iter_keys(inner, f"{key}[]")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield key, _type_name(tp), default, f.metadata.get("doc", "")



def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_example_toml() -> str:
    """The fully commented example settings file (``config/i3node.example.toml``).

    Generated from the dataclasses so documentation and code cannot drift apart; a
    test compares the shipped file with this output.
    """
    out = [
        "# i3node settings. Every key is optional: the values shown are the embedded defaults.",
        "# Unknown keys and bad values stop the node at start with an error naming the key.",
        "# Regenerate with: python -c 'from node.settings import render_example_toml as r; print(r(), end=\"\")'",
        "",
    ]
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.name in _INTERNAL:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(f"[{f.name}]")
            out.append(f"# {tp.__doc__.strip().splitlines()[0]}" if tp.__doc__ else "")
            for sub in dataclasses.fields(tp):
                out.append(f"# {sub.metadata.get('doc', '')}")
                out.append(f"{sub.name} = {_toml_value(sub.default)}")
            out.append("")
        else:
            inner = typing.get_args(tp)[0]
            out.append(f"# {f.metadata.get('doc', '')}")
            if not isinstance(f.default, tuple):
                raise TypeError(f"{f.name}: a list-of-tables setting needs a tuple default, got {f.default!r}")
            items = f.default if f.default else (inner(),)
            commented = not f.default
            for item in items:
                out.append(("# " if commented else "") + f"[[{f.name}]]")
                for sub in dataclasses.fields(inner):
                    out.append(f"# {sub.metadata.get('doc', '')}")
                    out.append(("# " if commented else "") + f"{sub.name} = {_toml_value(getattr(item, sub.name))}")
            out.append("")
    return "\n".join(out)
