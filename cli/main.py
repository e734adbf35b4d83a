"""The `dpdm` command: a thin click layer over accounting/, dpdm/ and audits/.

Every subcommand lives in its own module and imports torch only inside its body, so that
`import cli` (and `dpdm plan`) starts fast.

Exit codes (DESIGN.md section 6): 0 success / audit PASS; 1 audit FAIL; 2 bad input or usage (one
line naming the option and the value, no traceback); 3 audit INCONCLUSIVE; 4 runtime failure (any
other exception: its traceback, then one `dpdm: runtime failure: ...` line); 130 interrupted (Ctrl-C); 143
terminated (SIGTERM).
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys

import click

from cli.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, BadInput

_COMMANDS = {
    # name: (module, attribute)
    "plan": ("cli.plan", "plan"),
    "account": ("cli.plan", "account"),
    "train": ("cli.train", "train"),
    "sample": ("cli.sample", "sample"),
    "export": ("cli.export", "export"),
    "eval": ("cli.eval", "eval_cmd"),
    "baseline": ("cli.baseline", "baseline"),
    "audit": ("cli.audit", "audit"),
    "demo": ("cli.demo", "demo"),
}


# SIGTERM's exit code, 128 + 15, as a process killed by it has: it tells a scheduler's stop (`docker stop`, Slurm's
# preemption, systemd) from a Ctrl-C (130), and keeps the code such a stop gave before it had a line of its own.
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived while a command ran (`_sigterm_raises_terminated`). A BaseException, as KeyboardInterrupt is,
    so it takes Ctrl-C's path through the commands: no `except Exception` swallows it, and every write in flight
    is abandoned the way an interrupted one is (atomic writes keep the file as it was). Not a KeyboardInterrupt,
    which click turns into its Abort after writing an empty line."""


@contextlib.contextmanager
def _sigterm_raises_terminated():
    """Raises `Terminated` at SIGTERM while the block runs. SIGTERM's default action ended a command (`dpdm train`
    under a scheduler) at once, exit 143, with no `dpdm:` line saying why, where Ctrl-C says `dpdm: aborted`.

    Left alone outside the main thread (where Python cannot set a handler), where SIGTERM is already ignored or
    handled (an embedding program's choice), and in a rank of several (WORLD_SIZE above 1, as
    `dpdm.distributed.launched_by_torchrun` reads it; not imported, as it imports torch): a Python handler runs
    between bytecodes only, so a rank blocked in the rendezvous or a collective did not see torchrun's SIGTERM,
    and the agent killed it after its 30 s grace (SIGKILL), where the default action ends it at once. The agent
    reports each rank's signal itself. The handler resets SIGTERM's default first, so a second SIGTERM ends the
    process at once, as before."""
    import os
    import signal
    import threading

    if _launched_by_torchrun() or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _launched_by_torchrun() -> bool:
    """Whether WORLD_SIZE names more than one process: `dpdm.distributed.launched_by_torchrun`, read the same way
    without importing it (it imports torch, which `dpdm plan` and `--help` avoid)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    return not (size.isdecimal() and int(size) <= 1)


# What a command other than `dpdm train` would do once per rank under torchrun, where it says more than "run again".
_PER_RANK = {
    "baseline": "each rank would train its own DP-SGD classifier on the private data, a release the plan's epsilon "
                "does not count",
    "audit": "each rank would train its own canary runs and write the report over the others'",
    "demo": "each rank would train and write the demo again",
}


def _refuse_torchrun(name: str | None) -> None:
    """Only `dpdm train` runs on several processes (it sets up the process group). Under torchrun any other command
    ran once per rank: `dpdm baseline` trained N separate DP-SGD classifiers on the private data, each printed at
    one plan's epsilon (h153 F1, stop 55). Refused before any work or write, one line, exit 2."""
    if name is None or name == "train" or not _launched_by_torchrun():
        return
    size = os.environ["WORLD_SIZE"].strip()
    shown = size if size.isdecimal() else repr(os.environ["WORLD_SIZE"])
    why = _PER_RANK.get(name, "each rank would run it again")
    raise BadInput(f"dpdm {name} runs in one process, not under torchrun (WORLD_SIZE={shown}): {why}; run it "
                   "without torchrun, or unset WORLD_SIZE (only dpdm train runs on several processes)")


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        import importlib

        module_name, attr = _COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                return None  # not built yet
            raise
        return getattr(module, attr)

    def invoke(self, ctx: click.Context):
        """Ctrl-C in a command reaches `main` as click's Abort, without the empty line click's own handler writes
        first (two lines on stderr where the exit codes promise one)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpdm")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """dpdm: differentially private diffusion models.

    \b
    dpdm plan --eps 10 --delta 1e-5 --out plan.json   calibrate the noise, write a locked plan
    dpdm train --plan plan.json --out RUN
    dpdm sample --run RUN --n 1000 --out samples.npz
    dpdm eval --samples samples.npz --dataset mnist5k
    dpdm audit --run RUN --out report
    dpdm export --run RUN --out model.pt              the model file to release (no secrets)
    """
    _refuse_torchrun(ctx.invoked_subcommand)   # before the command parses its options, reads or writes anything


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())   # click 8.1 prints the help itself


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the group and turns every user mistake into one line, exit 2."""
    prog = "dpdm"
    try:
        with _sigterm_raises_terminated():
            rv = cli.main(args=argv, prog_name=prog, standalone_mode=False)
    except Terminated:
        click.echo(f"{prog}: terminated (SIGTERM); files written before are kept{_resume_hint(argv)}", err=True)
        return EXIT_TERMINATED
    except click.exceptions.Exit as e:  # --help, --version
        return int(e.exit_code)
    except click.exceptions.Abort:
        # On a terminal the line follows the "^C" the terminal echoed, so it starts a line of its own. What continues
        # a training run, as SIGTERM's line says: Ctrl-C's said only "aborted" (h103 F3).
        click.echo(f"{chr(10) if _stderr_is_a_terminal() else ''}{prog}: aborted{_resume_hint(argv)}", err=True)
        return 130
    except _NO_ARGS_IS_HELP as e:  # bare `dpdm` or `dpdm baseline` (click >= 8.2): the help, as it is
        click.echo(e.ctx.get_help(), err=True)
        return EXIT_BAD_INPUT
    except click.UsageError as e:  # bad option, bad value, missing option
        click.echo(f"{prog}: error: {_one_line(e.format_message())}", err=True)
        return EXIT_BAD_INPUT
    except BadInput as e:
        click.echo(f"{prog}: error: {_one_line(str(e))}", err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as e:
        code = EXIT_RUNTIME if e.exit_code in (0, 1) else e.exit_code  # 1 is "audit FAIL" only
        kind = "runtime failure" if code == EXIT_RUNTIME else "error"   # exit 4 reads alike on every path
        click.echo(f"{prog}: {kind}: {_one_line(e.format_message())}", err=True)
        return code
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted{_resume_hint(argv)}", err=True)
        return 130
    except Exception as e:
        # The machine, not dpdm: out of memory, a full disk or quota. One line (no traceback); the atomic writes
        # have left every file written before as it was.
        if _out_of_memory(e):
            click.echo(f"{prog}: runtime failure: {_out_of_memory_line(e, argv)}", err=True)
            return EXIT_RUNTIME
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            click.echo(f"{prog}: runtime failure: no space left on the device ({_one_line(str(e))}); files "
                       "written before are kept", err=True)
            return EXIT_RUNTIME
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG,
                                                  errno.ENAMETOOLONG):
            # A folder that turned read-only (a remount after disk errors), an I/O error, permissions taken away
            # mid-command, a file-size limit (`ulimit -f`, a scheduler's): the machine again. Outputs are checked
            # before any work (`report_utils.output_parent_problem`: a folder that takes no new file, a name over
            # NAME_MAX), and so are the input files of train, eval --samples and sample's and export's
            # --checkpoint/--run (`_common.input_name_problem`: a name over NAME_MAX is bad input, exit 2).
            click.echo(f"{prog}: runtime failure: {_one_line(str(e))} ({errno.errorcode[e.errno]}); files written "
                       "before are kept", err=True)
            return EXIT_RUNTIME
        return _internal_error(prog, e)  # a bug or an environment failure: never exit 1, which means "audit FAIL"
    return int(rv or 0)


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed
        return False


# The option that lowers a command's peak memory, for the out-of-memory line.
_MEMORY_KNOB = {"train": "a smaller --physical-batch needs", "baseline": "a smaller --physical-batch needs",
                "sample": "a smaller --batch-size needs",
                "plan": "fewer steps or more noise need", "account": "fewer steps or more noise need"}


def _out_of_memory(e: BaseException) -> bool:
    """`dpdm.memory.out_of_memory`, imported when an error comes (the CLI loads no more than it needs)."""
    from dpdm.memory import out_of_memory

    return out_of_memory(e)


def _out_of_memory_line(e: BaseException, argv: list[str] | None) -> str:
    """One line for a run that ran out of memory: the size asked for where torch says it, the device, and the
    option that needs less. Not a bug (no traceback) and not bad input (exit 4): the same command may fit
    on a larger machine. Checkpoints and outputs are written atomically, so nothing written before is lost."""
    import re

    text = str(e)
    asked = re.search(r"[Tt]ried to allocate (\d+) bytes", text)
    size = f" (tried to allocate {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
    if not size:
        asked = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]iB)", text)
        size = f" (tried to allocate {asked.group(1)})" if asked else ""
    where = "GPU" if any(s in text.upper() for s in ("CUDA", "CUBLAS", "CUDNN")) else "machine"
    knob = _MEMORY_KNOB.get(_command_name(argv))
    args = sys.argv[1:] if argv is None else argv
    if knob and _command_name(argv) == "train" and "--resume" not in args and any(
            a == "--public-subspace" or a.startswith("--public-subspace=") for a in args):
        # a new run's: a resume keeps the run's --subspace-examples (r2 F2, stop 53)
        # the public gradients of each subspace recomputation are held whole, whatever the chunk (h135 F1, stop 53)
        knob = "a smaller --physical-batch or --subspace-examples needs"
    hint = f"; {knob} less" if knob else ""
    return f"out of memory on the {where}{size}{hint}; files written before are kept{_resume_hint(argv)}"


def _command_name(argv: list[str] | None) -> str:
    """The subcommand's name: the first argument that is no option ('' when none)."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


def _resume_hint(argv: list[str] | None) -> str:
    """What continues a `dpdm train` that ended early (Ctrl-C, SIGTERM, out of memory): `--resume` where its --out
    holds a checkpoint; before the first one (start-up, or the first --checkpoint-every steps) there is nothing to
    resume, and `--resume` was refused ("nothing to resume") after the line had advised it (stop 46, h87 F1): the
    same command starts it again (a folder of a run killed before its first checkpoint is taken as new)."""
    if _command_name(argv) != "train":
        return ""
    args = sys.argv[1:] if argv is None else argv
    out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
    if out is None and "--out" in args[:-1]:
        out = args[args.index("--out") + 1]
    try:
        checkpointed = out is not None and os.path.isfile(os.path.join(os.path.expanduser(out), "checkpoint.pt"))
    except (OSError, ValueError):
        checkpointed = False
    if checkpointed:
        steps = _finished_steps(os.path.join(os.path.expanduser(out), "checkpoint.pt"))
        if steps is not None:   # a signal after the last checkpoint: --resume refuses a finished run (h106 F2)
            return (f"; the run is complete ({steps} of {steps} steps): dpdm sample and dpdm export use it as it is "
                    "(--resume refuses a finished run)")
        return "; a training run continues with --resume"
    from cli._common import unsaved_steps_advice

    advice = unsaved_steps_advice(out) if out is not None else None
    if advice:   # a new run there is refused without --spend-unsaved-steps (`dpdm.train.STEPS_RECORD`)
        return f"; no checkpoint was written yet, but {advice}"
    return "; no checkpoint was written yet: the same command starts the run again"


def _finished_steps(path: str) -> int | None:
    """The plan's steps where the checkpoint's ledger has them all done; else (or unreadable: the hint is advice
    only) None. Memory-mapped, weights_only: the weights are not read. Only with torch imported already (a run
    that reached its last checkpoint has): importing it again after a signal cut its first import short crashed
    the process (SIGSEGV in torch._C) instead of printing the line (r1 F1, stop 50)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "load"):
        return None
    try:
        ledger = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["ledger"]
        done, steps = ledger["steps_done"], ledger["plan_steps"]
        if isinstance(steps, int) and steps > 0 and done == steps:
            return steps
    except (Exception, KeyboardInterrupt):   # a second Ctrl-C while it reads: the usual hint
        pass
    return None


def _internal_error(prog: str, e: BaseException) -> int:
    import traceback

    traceback.print_exception(e, file=sys.stderr)  # for a bug report
    click.echo(f"{prog}: runtime failure: {_one_line(f'{type(e).__name__}: {e}')}", err=True)
    return EXIT_RUNTIME


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
