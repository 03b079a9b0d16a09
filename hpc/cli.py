"""The ``hpcdist`` command line: one click group whose subcommands load on first use.

    hpcdist --help
    hpcdist render --nodes 2 --backend deepspeed --dry-run
"""

from __future__ import annotations

import importlib
import sys

import click

from hpc import __version__

# name -> "module:attribute"; a subcommand's module is imported only when that command is used or
# listed, and none of them imports torch, so `hpcdist --help` stays instant.
COMMANDS = {
    "env": "hpc.commands.env:env",
    "render": "hpc.commands.render:render",
    "hostfile": "hpc.commands.render:hostfile",
    "submit": "hpc.commands.submit:submit",
    "status": "hpc.commands.submit:status",
    "logs": "hpc.commands.submit:logs",
    "cancel": "hpc.commands.submit:cancel",
    "watch": "hpc.commands.submit:watch",
    "list": "hpc.commands.submit:list_jobs",
    "plan": "hpc.commands.plan:plan",
    "bench": "hpc.commands.bench:bench",
    "doctor": "hpc.commands.doctor:doctor",
    "top": "hpc.commands.observe:top",
    "timeline": "hpc.commands.observe:timeline_cmd",
    "report": "hpc.commands.observe:report_cmd",
    "clusters": "hpc.commands.clusters:clusters",
    "profile": "hpc.commands.profile:profile",
    "sweep": "hpc.commands.sweep:sweep",
    "attempt": "hpc.commands.attempt:attempt",
    "drill": "hpc.commands.drill:drill",
}


# click >= 8.2 reports a bare group invocation as this usage error, whose message is the whole help.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class LazyGroup(click.Group):
    def main(self, *args, **kwargs):
        """click's own main, except that a usage error is one line (with where to find help), exit 2."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            super().main(*args, **{**kwargs, "standalone_mode": False})
            sys.exit(0)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except _NO_ARGS_IS_HELP as exc:
            # `hpcdist` alone: the help is the answer (click's own behaviour).
            click.echo(exc.ctx.get_help(), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "hpcdist"
            hint = f" (see {command} --help)" if isinstance(exc, click.UsageError) else ""
            message = " ".join(exc.format_message().split())
            click.echo(f"{command}: {message}{hint}", err=True)
            sys.exit(exc.exit_code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcdist")
def main() -> None:
    """Render, check and submit Slurm jobs for DataParallel, DDP and DeepSpeed training."""
