"""Experiment trackers: optional Weights & Biases and MLflow sinks for a stage's run.

A stage's ``run(cfg)`` wrapped with ``@tracked`` opens the trackers its ``log.wandb`` /
``log.mlflow`` sections ask for (off by default), on the main process only: the resolved
config goes with the run (flattened to dotted keys: wandb config, MLflow params), every
``runtime.logging.RunLogger.log(step, tag, **scalars)`` line follows as ``<tag>/<name>``
metrics, and the dict ``run`` returns becomes the run summary (wandb summary, MLflow metrics
at the last logged step; text values as ``summary.<key>`` tags). The tracker run is closed
in every case: finished, failed (an exception) or killed (a stop signal, ``Preempted``). A
resumed run (``checkpoint.resume`` set) continues the tracker runs recorded in
``<out_dir>/trackers.json``.

``wandb`` and ``mlflow`` (``mlflow-skinny`` is enough) are imported only when asked for:
the ``trackers`` extra installs them (``TRACKERS_INSTALL``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import numbers
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, TypeVar

from runtime.config import help_text, to_dict
from runtime.dist import is_main_process
from runtime.errors import UserError
from runtime.io import atomic_write_text
from runtime.preemption import PREEMPTED_EXIT_CODE, Preempted

logger = logging.getLogger(__name__)

TRACKERS_INSTALL = "pip install videomae-pipeline[trackers]"
TRACKER_IDS_FILE = "trackers.json"
Status = Literal["FINISHED", "FAILED", "KILLED"]
# MLflow's limits on a param value and a tag value (characters), and what a name may hold
MLFLOW_PARAM_LIMIT, MLFLOW_TAG_LIMIT = 6000, 8000
MLFLOW_NAME_REFUSED = re.compile(r"[^\w./\- :]")

R = TypeVar("R", bound=Mapping)


class TrackerMissingError(UserError, ImportError):
    """A tracker is switched on in the config but its package is not installed."""


def _missing(package: str, option: str) -> str:
    return (f"{option} is set but the {package} package is not installed: "
            f"{TRACKERS_INSTALL} (or set {option}='' to switch it off)")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def import_tracker(package: str, option: str) -> Any:
    """``import package``, or a ``TrackerMissingError`` naming ``option`` and the extra."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise TrackerMissingError(_missing(package, option)) from err


@dataclass
class WandbConfig:
    project: str = field(default="", metadata=help_text(
        "Weights & Biases project: set it to log the run to W&B ('' = off; needs the "
        "trackers extra)"))
    entity: str = field(default="", metadata=help_text(
        "W&B team or user owning the project ('' = your default entity)"))
    name: str = field(default="", metadata=help_text("run name ('' = the run folder's name)"))
    group: str = field(default="", metadata=help_text("W&B group of the run ('' = none)"))
    tags: list[str] = field(default_factory=list, metadata=help_text("W&B tags of the run"))
    mode: Literal["online", "offline"] = field(default="online", metadata=help_text(
        "online: stream to the W&B server (wandb login or WANDB_API_KEY); offline: write "
        "<dir>/wandb/offline-run-*, uploaded later with `wandb sync`"))
    dir: str = field(default="", metadata=help_text(
        "folder W&B writes its files into ('' = the run folder)"))

    @property
    def enabled(self) -> bool:
        return bool(self.project)

    def validate(self) -> None:
        if self.enabled and not _installed("wandb"):
            raise ValueError(_missing("wandb", "project"))


@dataclass
class MlflowConfig:
    experiment: str = field(default="", metadata=help_text(
        "MLflow experiment (created when missing): set it to log the run to MLflow ('' = "
        "off; needs the trackers extra)"))
    tracking_uri: str = field(default="", metadata=help_text(
        "where MLflow keeps runs: http(s)://server, databricks, or file:///path (MLflow 3 "
        "accepts a file store only with MLFLOW_ALLOW_FILE_STORE=true); '' = "
        "MLFLOW_TRACKING_URI"))
    run_name: str = field(default="", metadata=help_text("run name ('' = the run folder's name)"))

    @property
    def enabled(self) -> bool:
        return bool(self.experiment)

    def validate(self) -> None:
        if self.enabled and not _installed("mlflow"):
            raise ValueError(_missing("mlflow", "experiment"))


def wandb_field() -> Any:
    """The ``log.wandb`` field of a stage's log section."""
    return field(default_factory=WandbConfig, metadata=help_text(
        "Weights & Biases tracking (off unless log.wandb.project is set)"))


def mlflow_field() -> Any:
    """The ``log.mlflow`` field of a stage's log section."""
    return field(default_factory=MlflowConfig, metadata=help_text(
        "MLflow tracking (off unless log.mlflow.experiment is set)"))


def flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level with dotted keys (``{"model": {"depth": 4}}`` ->
    ``{"model.depth": 4}``); other values (lists included) are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(
        value, "ndim", 1) == 0)


def mlflow_name(key: str) -> str:
    """``key`` with the characters MLflow refuses in a metric or tag name as ``_``
    (``mAP@0.5`` -> ``mAP_0.5``)."""
    return MLFLOW_NAME_REFUSED.sub("_", key)


def _text(value: Any, limit: int, key: str) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > limit:
        logger.warning("MLflow keeps at most %d characters of %s: the rest is only in the run "
                       "folder's files", limit, key)
    return text[:limit]


class Sink(Protocol):
    run_id: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def summarise(self, step: int, summary: dict[str, Any]) -> None: ...

    def close(self, status: Status) -> None: ...


class WandbSink:
    """One W&B run: the config, metrics against a ``step`` axis of their own (so lines logged
    out of order or again after a resume keep their steps), the summary."""

    EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": PREEMPTED_EXIT_CODE}

    def __init__(self, cfg: WandbConfig, out_dir: Path, params: dict[str, Any],
                 resume_id: str | None):
        wandb = import_tracker("wandb", "log.wandb.project")
        folder = Path(cfg.dir or out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or out_dir.name,
            group=cfg.group or None, tags=list(cfg.tags) or None, mode=cfg.mode,
            dir=str(folder), config=params, id=resume_id,
            resume="allow" if resume_id else None)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def summarise(self, step: int, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def close(self, status: Status) -> None:
        if status == "KILLED":
            self.run.mark_preempting()
        self.run.finish(exit_code=self.EXIT_CODES[status])


class MlflowSink:
    """One MLflow run through ``MlflowClient`` (no process-wide active run): params, metric
    history, the summary as metrics at the last step, the final status."""

    def __init__(self, cfg: MlflowConfig, out_dir: Path, params: dict[str, Any],
                 resume_id: str | None):
        import_tracker("mlflow", "log.mlflow.experiment")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri or None)
        logged: dict[str, str] = {}
        if resume_id:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            logged = self.client.get_run(resume_id).data.params
        else:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                try:
                    experiment_id = self.client.create_experiment(cfg.experiment)
                except MlflowException:  # created meanwhile by another run
                    experiment_id = self.client.get_experiment_by_name(
                        cfg.experiment).experiment_id
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or out_dir.name,
                                         tags={"out_dir": str(out_dir.resolve())})
            self.run_id = run.info.run_id
        texts = {key: _text(value, MLFLOW_PARAM_LIMIT, key) for key, value in params.items()}
        changed = sorted(k for k in texts if k in logged and logged[k] != texts[k])
        if changed:  # MLflow params cannot change: the run folder's config.yaml has them
            logger.warning("resumed MLflow run %s keeps its first values of %s", self.run_id,
                           ", ".join(changed))
        self._log_batch(params=[(k, v) for k, v in texts.items() if k not in logged])

    def _log_batch(self, params=(), metrics=(), step: int = 0, tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step)
                                                    for k, v in metrics],
                              params=[Param(k, v) for k, v in params],
                              tags=[RunTag(mlflow_name(k), v) for k, v in tags])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._log_batch(metrics=list(scalars.items()), step=step)

    def summarise(self, step: int, summary: dict[str, Any]) -> None:
        numbers_ = [(k, float(v)) for k, v in summary.items() if _is_number(v)]
        texts = [(f"summary.{k}", _text(v, MLFLOW_TAG_LIMIT, k)) for k, v in summary.items()
                 if not _is_number(v)]
        self._log_batch(metrics=numbers_, tags=texts, step=step)

    def close(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status=status)


SINKS: dict[str, Callable[..., Sink]] = {"wandb": WandbSink, "mlflow": MlflowSink}


class TrackerSession:
    """The open tracker runs of one stage run (main process only)."""

    def __init__(self, sinks: dict[str, Sink]):
        self.sinks = sinks
        self.last_step = 0
        self.failed_lines = {name: 0 for name in sinks}

    def log(self, step: int, tag: str, scalars: Mapping[str, float]) -> None:
        """Send one metrics line to every tracker. A tracker failing to take it (a server
        out of reach) does not stop training: the first failure is logged with its cause,
        the count at ``close``; the run folder's metrics.jsonl keeps every line."""
        named = {f"{tag}/{name}": float(value) for name, value in scalars.items()}
        self.last_step = max(self.last_step, int(step))
        for name, sink in self.sinks.items():
            try:
                sink.log(int(step), named)
            except Exception:  # noqa: BLE001 - see the docstring
                self.failed_lines[name] += 1
                if self.failed_lines[name] == 1:
                    logger.warning("the %s run %s did not take the metrics of step %d (later "
                                   "failures are counted)", name, sink.run_id, step,
                                   exc_info=True)

    def summarise(self, summary: Mapping[str, Any]) -> None:
        flat = flatten(summary)
        for sink in self.sinks.values():
            sink.summarise(self.last_step, flat)

    def close(self, status: Status) -> None:
        """Close every tracker run; a failure to close one is logged, not raised (the run's
        own outcome and files stay what they are)."""
        for name, sink in self.sinks.items():
            if self.failed_lines[name]:
                logger.warning("the %s run %s is missing %d metrics lines (metrics.jsonl has "
                               "them)", name, sink.run_id, self.failed_lines[name])
            try:
                sink.close(status)
            except Exception:  # noqa: BLE001 - the run's result matters more than its echo
                logger.warning("could not close the %s run %s", name, sink.run_id,
                               exc_info=True)


_active: TrackerSession | None = None


def active_session() -> TrackerSession | None:
    """The session of the stage run in progress in this process (None: no tracker is on,
    or this is not the main process)."""
    return _active


def _recorded_ids(cfg: Any, out_dir: Path) -> dict[str, str]:
    """Tracker run ids of the run this one resumes (``checkpoint.resume`` set and
    ``trackers.json`` in the run folder), else none."""
    resume = getattr(getattr(cfg, "checkpoint", None), "resume", "")
    path = out_dir / TRACKER_IDS_FILE
    if not resume or not path.is_file():
        return {}
    return json.loads(path.read_text())


def open_session(cfg: Any) -> TrackerSession | None:
    """Open the trackers ``cfg.log`` switches on (main process only; None when there are
    none), with ``cfg``'s resolved config as the run's parameters."""
    log_cfg = getattr(cfg, "log", None)
    wanted = {name: section for name in SINKS
              if (section := getattr(log_cfg, name, None)) is not None and section.enabled}
    if not wanted or not is_main_process():
        return None
    resolved = cfg.resolve() if hasattr(cfg, "resolve") else cfg
    out_dir = Path(resolved.out_dir)
    params = flatten(to_dict(resolved))
    recorded = _recorded_ids(resolved, out_dir)
    sinks: dict[str, Sink] = {}
    try:
        for name, section in wanted.items():
            sinks[name] = SINKS[name](section, out_dir, params, recorded.get(name))
    except BaseException:
        TrackerSession(sinks).close("FAILED")
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / TRACKER_IDS_FILE, json.dumps(
        {name: sink.run_id for name, sink in sinks.items()}, indent=2) + "\n")
    logger.info("tracking the run with %s", ", ".join(
        f"{name} (run {sink.run_id})" for name, sink in sinks.items()))
    return TrackerSession(sinks)


def _status_of(error: BaseException) -> Status:
    return "KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED"


def tracked(run: Callable[[Any], R]) -> Callable[[Any], R]:
    """Decorator for a stage's ``run(cfg) -> dict``: the trackers ``cfg.log`` asks for are
    open while it runs (see the module docstring); a run inside another tracked run (one
    stage calling another) logs into the outer one."""

    @functools.wraps(run)
    def wrapper(cfg: Any) -> R:
        global _active
        if _active is not None:
            return run(cfg)
        session = open_session(cfg)
        if session is None:
            return run(cfg)
        _active, status = session, "FAILED"
        try:
            summary = run(cfg)
            session.summarise(summary)
            status = "FINISHED"
            return summary
        except BaseException as error:
            status = _status_of(error)
            raise
        finally:
            _active = None
            session.close(status)

    return wrapper
