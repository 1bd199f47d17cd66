"""One pytest session's gate: options, the baseline store, and running one gated test end to end.

This is the glue between the engine and the plugin: the ``plugin`` subpackage turns pytest's options into a
:class:`GateOptions`, asks :class:`GateSession` for skip reasons and configs, and hands fixtures a
:class:`TestGate` whose ``run`` measures, judges and (under ``--ampgate-update``) prepares a
baseline.  Nothing here imports pytest, so the same flow can be driven from a script.
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .baselines import Baseline, BaselineStore
from .config import GateConfig, build_config
from .errors import BaselineError, ConfigError
from .profiles import CPU_PROFILE, CPU_WORKLOAD_SIZES


@dataclass(frozen=True)
class GateOptions:
    """The session-wide settings, from command-line flags and ini options."""

    enabled: bool = False
    update: bool = False
    prune: bool = False
    device: str = "cuda"
    baseline_dir: Path = Path("baselines")
    data_root: str | None = None
    download: bool = False
    strict: bool = False
    ini_settings: Mapping[str, Any] = field(default_factory=dict)
    """``ampgate_<setting>`` values from the ini file (or ``-o``), by setting name; unset ones left out."""
    rerun_args: tuple[str, ...] = ()
    """What a command printed for this run must repeat to work as printed: the options that chose
    the device, the baseline directory, the data and the settings (a CPU run's update command
    without ``--ampgate-device cpu`` fails for want of a GPU)."""
    rootdir_from_cwd: str = ""
    """The rootdir relative to the directory pytest was started in ("" when the same), so a test id
    (relative to the rootdir) can be named in a printed command."""

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def update_command(self, test_id: str = "") -> str:
        """The update command for this run, for one test when ``test_id`` is given, runnable as printed."""
        from .verdict import UPDATE_COMMAND

        words = list(self.rerun_args)
        if test_id:
            words.append(posixpath.join(self.rootdir_from_cwd, test_id) if self.rootdir_from_cwd else test_id)
        return " ".join([UPDATE_COMMAND, *(shlex.quote(w) for w in words)])

    def with_commands(self, text: str, test_id: str = "") -> str:
        """``text`` with the engine's bare update command completed for this run (idempotent).

        The engine's messages (verdict hints, baseline-file errors) cannot know how pytest was
        started; the plugin completes them wherever it shows them.
        """
        from .verdict import UPDATE_COMMAND

        full = self.update_command(test_id)
        return text.replace(full, UPDATE_COMMAND).replace(UPDATE_COMMAND, full)


def validate_device(device: str) -> str:
    """Accept 'cuda', 'cuda:N' or 'cpu' (what --ampgate-device takes)."""
    text = (device or "").strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cuda", "cpu") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"--ampgate-device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    return text


class GateSession:
    """Everything gated tests in one pytest session share."""

    def __init__(self, options: GateOptions, progress: Callable[[str], None] | None = None):
        self.options = options
        self.store = BaselineStore(options.baseline_dir)
        self.progress = progress
        self.results: list = []
        self._env = None
        self._skip_reason: tuple[str | None] | None = None

    def skip_reason(self) -> str | None:
        """Why gated tests cannot run in this session, or None.  Creates no CUDA context.

        Asked at collection, for every gated test and at session end; the answer cannot change
        within a session, so it is worked out once.
        """
        if self._skip_reason is None:
            self._skip_reason = (self._find_skip_reason(),)
        return self._skip_reason[0]

    def _find_skip_reason(self) -> str | None:
        if not self.options.enabled:
            return "AMP regression test: run it with pytest --ampgate"
        if self.options.device_type == "cuda":
            import torch

            if not torch.cuda.is_available():
                return (
                    "no CUDA device available for the AMP gate (--ampgate-device cuda); "
                    "run the numerical checks on the CPU with --ampgate --ampgate-device cpu"
                )
            index = int(self.options.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                return f"--ampgate-device {self.options.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None

    def config_for(self, test_id: str, marker_args: Sequence[Any] = (), marker_kwargs: Mapping[str, Any] | None = None) -> GateConfig:
        """Defaults, the CPU profile (on cpu), ini options, then the test's marker arguments."""
        if marker_args:
            raise ConfigError(f"marker amp_regression on {test_id}: takes keyword arguments only, got positional {list(marker_args)!r}")
        layers = []
        if self.options.device_type == "cpu":
            layers.append(("CPU profile", CPU_PROFILE))
        layers.append(("ini option ampgate_<name>", dict(self.options.ini_settings)))
        layers.append((f"marker amp_regression on {test_id}", dict(marker_kwargs or {})))
        config = build_config(*layers)
        if config.world_size is None:
            from .distributed import require_world_size

            require_world_size(config.modes, config.world_size, f"marker amp_regression on {test_id}")
        if self.options.strict and not config.strict:
            config = dataclasses.replace(config, strict=True)
        return config

    def distributed_skip_reason(self, config: GateConfig) -> str | None:
        """Why a test with ``world_size`` cannot run here (no torch.distributed, backend or enough devices), or None."""
        if config.world_size is None:
            return None
        from .distributed import unavailable_reason
        from .distributed.in_job import local_ranks

        return unavailable_reason(local_ranks(config.world_size), self.options.device)

    def environment(self):
        if self._env is None:
            from .env import fingerprint

            self._env = fingerprint(self.options.device)
        return self._env


class TestGate:
    """What the ``ampgate`` fixture hands a test: ``run(workload)`` measures and judges it."""

    __test__ = False  # not a test class, whatever pytest's collection patterns say

    def __init__(self, session: GateSession, test_id: str, config: GateConfig):
        self.session = session
        self.test_id = test_id
        self.config = config
        self.results: list = []

    @property
    def device(self) -> str:
        return self.session.options.device

    def run(self, workload, *, modes: Sequence[str] | None = None, dataset=None):
        """Measure ``workload`` (a built-in name or a :class:`Workload`) and judge it against this test's gate.

        The verdict is applied to the test automatically when it finishes; the returned
        :class:`GateResult` is there for asserts of your own.
        """
        from .baseline_checks import recordings_checks
        from .checks import stored_metric
        from .data import check_dataset
        from .gate import GateResult, baseline_from, decide, evaluate, record
        from .judging import Judging
        from .measurement import measure
        from .recordings import joined
        from .verdict import RECORD_HINT
        from .workloads import BUILTIN, get_workload, metric_of

        if self.results:
            raise ConfigError(
                f"{self.test_id}: one gated run per test (baselines are keyed by test id); "
                "split the workloads into separate tests or parametrize the test"
            )
        options = self.session.options
        check_dataset(dataset)
        by_name = isinstance(workload, str) and workload in BUILTIN
        from .distributed.in_job import job_world_size

        world_size = job_world_size(self.config.world_size)  # under torchrun on every node: the whole job
        if world_size is not None:  # the ranks build the workload from its reference (see distributed.py)
            from .distributed import workload_reference

            if dataset is not None:
                raise ConfigError(
                    f"{self.test_id}: world_size runs the workload in other processes; give its data through the workload, not dataset="
                )
            reference, workload = workload_reference(workload)
        else:
            workload = get_workload(workload)
        sizes = CPU_WORKLOAD_SIZES[workload.name] if options.device_type == "cpu" and by_name else {}
        if sizes:
            workload = workload.with_options(**sizes)
        config = self.config
        if modes is not None:
            config = build_config(("defaults", {}), ("run(modes=...)", {"modes": modes}))
            config = dataclasses.replace(self.config, modes=config.modes)
        metric = metric_of(workload)
        tolerances = metric.tolerances(config)  # refuses a setting outside this metric's limits before training
        env = self.session.environment()
        env_key = env.key()
        if world_size is not None:
            from .distributed import env_key as distributed_env_key

            env_key = distributed_env_key(env_key, world_size, options.device)
        else:
            from .distributed import require_world_size

            require_world_size(config.modes, None, self.test_id)

        def measure_once():
            if world_size is not None:
                from .distributed import measure_distributed

                return measure_distributed(
                    reference,
                    config.modes,
                    world_size=world_size,
                    device=options.device,
                    config=config.measure_config(),
                    timeout_s=config.distributed_timeout,
                    workload_options=sizes,
                    data_root=options.data_root,
                    download=options.download,
                    progress=self.session.progress,
                )
            return measure(
                workload,
                config.modes,
                device=options.device,
                config=config.measure_config(),
                dataset=dataset,
                data_root=options.data_root,
                download=options.download,
                progress=self.session.progress,
            )

        if options.update:
            try:  # a corrupt file would be refused at session end anyway: say so before measuring
                previous = self.session.store.lookup(self.test_id, env_key)
            except BaselineError as exc:
                raise BaselineError(f"refusing to update baselines: {exc}") from None
            config = dataclasses.replace(config, missing_baseline="ignore")
            measurements = record(measure_once, config)
            verdict = evaluate(
                measurements,
                config,
                None,
                missing_baseline_note="not compared: this run becomes the baseline (--ampgate-update)",
                recording=True,
                **tolerances,
            )
            baseline = None
            settings = {
                "config": config.to_dict(),
                "measure": measurements.config.to_dict(),
                "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better},
            }
            fresh = baseline_from(measurements, self.test_id, env_key, settings)
            to_store, how = joined(previous, fresh, config, measurements.device.split(":")[0])
            verdict.checks += recordings_checks(Judging(measurements, config, None, recording=True), to_store, how)
        else:
            baseline = self.session.store.lookup(self.test_id, env_key)
            note = ""
            if baseline is None:
                others = self.session.store.environments(self.test_id)
                where = f"recorded for: {'; '.join(others)}" if others else "none recorded for this test"
                note = f"no baseline for {env_key} ({where}); {RECORD_HINT}"
            measurements, verdict = decide(measure_once, config, baseline, missing_baseline_note=note, **tolerances)
        if world_size is not None:  # the checks only several ranks have: which rank went non-finite, replica drift
            from .distributed import judge

            verdict = judge(measurements, verdict)

        result = GateResult(
            test_id=self.test_id,
            env_key=env_key,
            measurements=measurements,
            verdict=verdict,
            baseline_accuracy={k: v.accuracy for k, v in baseline.modes.items() if v.accuracy is not None} if baseline else {},
            baseline_metric={
                k: stored_metric(v, metric.name) for k, v in baseline.modes.items() if stored_metric(v, metric.name) is not None
            }
            if baseline
            else {},
            strict=config.strict,
            config=config,
        )
        if options.update and not result.failed:
            result.update = to_store.to_entry()
        self.results.append(result)
        return result


def baseline_updates(results) -> Iterator[Baseline]:
    """The baselines of every result that carries one (only passed calls do), for ``BaselineStore.record``."""
    for r in results:
        if r.update is not None:
            yield Baseline.from_entry(r.test_id, r.env_key, r.update, f"update for {r.test_id}")
