"""One fused group of sweep jobs, from Hydra's job setup to each job's report: what app.sweep_job and
run_one.run do for one job, in phases, with the training of all of them in one fused loop."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.markup import escape

from kdrun.app import RUN_FAILURES, _remove_if_empty, find_completed, record_refusal, share_machine
from kdrun.errors import ConfigError
from kdrun.experiment import Execution, check_same_device, configure, prepare
from kdrun.fused.launcher import FUSED_DIR, job_return, job_setup
from kdrun.fused.stacked import stack_refusal
from kdrun.fused.trainer import RandomState, can_fuse, fit_together
from kdrun.interrupt import Interrupted, stop_on_signals, stop_requested
from kdrun.interrupt import request as request_stop
from kdrun.progress import RunProgress, console, print_error, print_summary
from kdrun.results import write_result
from kdrun.run_dir import RunLock, choose_run_dir
from kdrun.run_record import config_hash, default_run_dir
from kdrun.storage import check_output_space
from kdrun.sweep_summary import JobReport


@dataclass
class Member:
    config: DictConfig              # the job's whole config, hydra included
    cfg: DictConfig                 # the task's config
    job_dir: Path
    num: int
    report: JobReport
    chosen: list[Path] = field(default_factory=list)
    run: Execution | None = None    # started, not yet finished
    done: bool = False              # skipped, refused or finished already
    error: BaseException | None = None


class FusedGroup:
    def __init__(self, hydra_context, task_function, configs: list[DictConfig], stack: bool = False):
        self.hydra_context, self.task_function, self.configs = hydra_context, task_function, configs
        self.stack = stack  # fuse.stack=true: the students as one vmapped model, where stack_refusal allows
        self.lead_hydra = None
        self.counts: dict = {}

    def run(self):
        members = []
        with stop_on_signals(), contextlib.ExitStack() as locks:
            for config in self.configs:
                members.append(self.enter(config, locks))
            live = [m for m in members if m.run is not None]
            self.share_loaders(live)
            for m in live:
                self.guard(m, self.start)
            live = [m for m in live if not m.done]
            self.train(live)
            for m in live:
                self.finish(m)
        self.write_group_report(members)
        returns = []
        for m in members:
            HydraConfig.instance().set_config(m.config)
            _remove_if_empty(m.job_dir)
            ret = job_return(m.config, m.cfg)  # a failure is the job's report, as sweep_job's
            self.hydra_context.callbacks.on_job_end(config=m.config, job_return=ret)
            returns.append(ret)
        return returns

    # ----- before training: what sweep_job and run_with_handlers do ------------------------------------
    def enter(self, config: DictConfig, locks) -> Member:
        cfg = job_setup(config)
        hydra_cfg = HydraConfig.get()
        self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
        job_dir = Path(hydra_cfg.runtime.output_dir)
        num = hydra_cfg.job.num
        m = Member(config, cfg, job_dir, num, JobReport(Path(hydra_cfg.sweep.dir), num, list(hydra_cfg.overrides.task)))
        if self.lead_hydra is None:
            self.lead_hydra = hydra_cfg  # the group trains on one device: the first job's
        if stop_requested():
            m.report.write("interrupted", job_dir, "not started: the sweep was stopped")
            m.done = True
            return m
        if cfg.get("skip_completed", True):
            with contextlib.suppress(ConfigError):
                configure(cfg)
            done = find_completed(Path(cfg.results_dir), config_hash(cfg))
            if done is not None:
                console.print(escape(f"job {num} skipped: the same configuration completed in {done}"), highlight=False)
                m.report.write("skipped", done)
                m.done = True
                return m
        share_machine(cfg, self.lead_hydra)
        m.report.write("running", job_dir)
        self.guard(m, lambda m: self.choose(m, locks))
        return m

    def choose(self, m: Member, locks) -> None:
        cfg = m.cfg
        m.plan = prepare(cfg)
        target = choose_run_dir(cfg, config_hash(cfg), m.job_dir, lambda: default_run_dir(cfg), True)
        m.chosen.append(target.path)
        m.report.write("running", target.path)
        if target.completed is not None:
            console.print(f"{target.path} already holds this configuration, completed; left alone", highlight=False,
                          soft_wrap=True)
            print_summary(target.completed)
            m.report.write("completed", target.path)
            m.done = True
            return
        check_same_device(target, m.plan.settings.device)
        check_output_space(cfg, m.plan, target.path)
        locks.enter_context(RunLock(target.path))
        m.target = target
        m.run = "pending"

    def share_loaders(self, live: list[Member]) -> None:
        """One loader for the group: the jobs' loaders are equal (same data, batch size and seed)."""
        if not live:
            return
        lead = live[0].plan
        for m in live:
            plan = m.plan
            plan.train_loader = plan.student_loader = lead.student_loader
            plan.loader_rng, plan.test_loader = lead.loader_rng, lead.test_loader
            m.run = Execution(plan, m.target.path, resume=m.target.resume)

    def start(self, m: Member) -> None:
        m.run.start()
        m.run.fused_rng = RandomState(m.plan.settings.device)
        m.run.fused_loader_state = m.plan.loader_rng.get_state()
        m.run.fused_label = f"job {m.num}: {m.run.label}"

    # ----- training ---------------------------------------------------------------------------------------
    def train(self, live: list[Member]) -> None:
        if not live:
            return
        runs = [m.run for m in live]
        reason = can_fuse(runs) if len(runs) > 1 else "one job left"
        self.counts.update(fused=reason is None, reason=reason)
        stacked = self.choose_stacking(live, runs, reason)
        if reason is None:
            label = f"{'stacked' if stacked else 'fused'} {len(runs)}x {runs[0].label}"
            with RunProgress(label) as progress:
                errors = fit_together(runs, progress, self.counts, stacked)
            for k, exc in errors.items():
                live[k].error = exc
            return
        if len(runs) > 1:
            console.print(escape(f"kdrun: fuse: jobs {','.join(str(m.num) for m in live)} train one after another: "
                                 f"{reason}"), highlight=False, soft_wrap=True)
        for m in live:
            if stop_requested():
                m.error = Interrupted(f"{stop_requested()} before the run started")
                continue
            m.run.fused_rng.load()
            m.plan.loader_rng.set_state(m.run.fused_loader_state)
            try:
                with RunProgress(m.run.label) as progress:
                    m.run.train(progress)
            except BaseException as exc:  # noqa: BLE001 - recorded in finish
                m.error = exc

    def choose_stacking(self, live: list[Member], runs, reason: str | None) -> bool:
        """fuse.stack=true: whether the group's students step as one stacked model; one line when they cannot
        (a group that trains one job after another has said why already). The group report records it."""
        why = None if reason is None else f"the jobs train one after another ({reason})"
        if self.stack and why is None:
            why = stack_refusal(runs)
            if why is not None:
                console.print(escape(f"kdrun: fuse.stack: jobs {','.join(str(m.num) for m in live)} are not "
                                     f"stacked, they step one after another: {why}"), highlight=False, soft_wrap=True)
        stacked = self.stack and why is None
        self.counts["stacked"] = stacked
        if self.stack and not stacked:
            self.counts["stack_reason"] = why
        return stacked

    def finish(self, m: Member) -> None:
        run = m.run
        try:
            if m.error is not None:
                raise m.error
            run.finish()
        except BaseException as exc:  # noqa: BLE001
            run.fail(exc)
            run.close()
            self.failed(m, exc, run.record.get("error"))
            return
        run.close()
        print_summary(run.record)
        m.report.write("completed", Path(run.record["run_dir"]))
        m.done = True

    # ----- outcomes -----------------------------------------------------------------------------------------
    def guard(self, m: Member, step) -> None:
        """Run one phase of a job; a failure or a stop is that job's outcome, as sweep_job records it."""
        try:
            step(m)
        except BaseException as exc:  # noqa: BLE001
            if m.run is not None and not isinstance(m.run, str):
                m.run.fail(exc)
                m.run.close()
            self.failed(m, exc, m.run.record.get("error") if isinstance(m.run, Execution) else None)
            m.run = None

    def failed(self, m: Member, exc: BaseException, recorded: str | None) -> None:
        m.done = True
        m.error = exc if isinstance(exc, Exception) else None
        where = m.chosen[-1] if m.chosen else m.job_dir
        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            request_stop("SIGINT")
            message = recorded or str(exc) or "Ctrl-C"
            print_error(f"job {m.num} interrupted:", message)
            m.report.write("interrupted", where, message)
            return
        if isinstance(exc, SystemExit):
            raise exc
        print_error(f"job {m.num} failed:", exc)
        record_refusal(m.cfg, m.job_dir, m.chosen, exc)
        m.report.write("failed", where, str(exc) if isinstance(exc, (ConfigError, *RUN_FAILURES))
                       else f"{type(exc).__name__}: {exc}")

    def write_group_report(self, members: list[Member]) -> None:
        if self.lead_hydra is None:
            return
        path = Path(self.lead_hydra.sweep.dir) / FUSED_DIR / f"{members[0].num}.json"
        with contextlib.suppress(OSError):
            write_result(path, {"jobs": [m.num for m in members], **self.counts})
