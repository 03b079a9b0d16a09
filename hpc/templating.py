"""Turn a template into script text safely: Jinja's sandbox, and the filters that quote each value for its place.

    env = environment(("/site/templates", str(paths.templates_dir())))
    text = render_template(env, "job.sbatch.j2", {"spec": spec, ...})

A template puts a value into a script only through a filter: ``| q`` (one shell word), ``| sbatch`` (one
batch-directive argument), ``| comment`` or ``| verbatim``; ``finalize`` fails the render otherwise.
"""

from __future__ import annotations

import functools
import re
import shlex
import traceback
import types
from typing import Any, Mapping

import jinja2
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import markupsafe

from hpc import shown, vocab
from hpc.spec import unwritable

_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+=,\[\]-]+")


class RenderError(ValueError):
    """A template that does not render, or a job directory that cannot be written; one line."""


class Shell(markupsafe.Markup):
    """Text a filter made fit for the place it goes: one shell word, one sbatch argument, a comment.

    The templates' finalize step lets only this (and a macro's output, made of it), whole numbers and
    plain tokens through, so a value that reaches a template without a filter fails the render instead of
    becoming code. It is Jinja's autoescaping machinery with refusal in place of HTML escaping: Markup is
    what Jinja already treats as "escaped", and a macro call returns Markup under autoescape.
    """

    @classmethod
    def escape(cls, s: Any, /) -> Shell:
        # Markup would HTML-escape what is joined to it (``v | q + raw``, ``"%s" | q | format(raw)``): the raw
        # value would reach the script unquoted and ``<`` would arrive as ``&lt;``.
        return s if isinstance(s, Shell) else cls(finalize(s, plain_only=True))


# Text that means the same unquoted in a shell command, an sbatch directive and a comment.
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.,:@%+=/-]*")


def _text(value: Any) -> str:
    """``value`` as text a file can hold, or RenderError (see ``hpc.spec.unwritable``)."""
    text = str(value)
    problem = unwritable(text)
    if problem:
        raise RenderError(f"value {ascii(text)} {problem}")
    return text


def quote(value: Any) -> Shell:
    """The ``q`` filter: one shell word that is the value, literally."""
    return Shell(shlex.quote(_text(value)))


def sbatch_quote(value: Any) -> Shell:
    """The ``sbatch`` filter: a batch-directive argument as sbatch's own parser reads it (no shell).

    sbatch splits directive lines on blanks, honours double quotes and backslash escapes, and ends at the
    line's end; newlines cannot be carried at all, which check() already refused.
    """
    text = _text(value)
    if "\n" in text or "\r" in text:
        raise RenderError(f"sbatch directive value {text!r} contains a newline; Slurm cannot carry it")
    if _SBATCH_PLAIN.fullmatch(text):
        return Shell(text)
    return Shell('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def submitit_directive(value: Any) -> str | None:
    """A value for one of submitit's ``#SBATCH`` lines, arriving in Slurm as job.sbatch's does.

    submitit shell-quotes each value (shlex.quote), and sbatch's directive parser honours those quotes
    but also reads a backslash as an escape even inside them (``'a\\b'`` would arrive as ``ab``); so each
    backslash is doubled, to arrive as one.
    """
    return None if value is None else _text(value).replace("\\", "\\\\")


def comment(value: Any) -> Shell:
    """The ``comment`` filter: text for a ``#`` comment, every unprintable character (a newline) escaped."""
    return Shell(shown.line(value, limit=1 << 30))


def verbatim(value: Any) -> Shell:
    """The ``verbatim`` filter: shell text by design, as it is: the site admin's profile setup lines (a line
    may hold several, an if/fi block), or a template's own literal shell words passed to a macro."""
    return Shell(_text(value))


def finalize(value: Any, plain_only: bool = False) -> str:
    """Every ``{{ ... }}`` result passes here: filtered text, whole numbers and plain tokens only."""
    # Only a filter's or a macro's Markup is checked text: ``| safe`` and Jinja's joins (``~``, ``| join``)
    # make Markup of raw values too, HTML-escaped.
    if isinstance(value, Shell) and not plain_only:
        return value
    if isinstance(value, jinja2.Undefined) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)  # a StrictUndefined fails here, naming the missing variable
    if isinstance(value, str) and _PLAIN_TOKEN.fullmatch(value):
        return value
    shown = str(value) if isinstance(value, markupsafe.Markup) else value
    raise RenderError(f"a template puts {shown!r} into a script unquoted; pass it through | q, | sbatch "
                      "or | comment")


class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja that reads values and calls macros, and nothing else.

    A site's templates come from a profile someone may have handed you, and rendering is a dry run: it must
    never run Python in your process. Jinja's sandbox already refuses private attributes (the
    ``cycler.__init__.__globals__`` road to ``os``) and mutation; on top, no module is reachable and the only
    callables are macros, Jinja's own globals (range, dict, cycler, ...) and their helpers' methods: no
    method of a value (``profile.environment``) runs.
    """

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(value, types.ModuleType) or isinstance(obj, types.ModuleType):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().call(__context, __obj, *args, **kwargs)
        # A macro's output is template text and values finalize already checked.
        return Shell(out) if isinstance(__obj, jinja2.runtime.Macro) and isinstance(out, markupsafe.Markup) else out

    def is_safe_callable(self, obj: Any) -> bool:
        if isinstance(obj, jinja2.runtime.Macro) or any(obj is helper for helper in self.globals.values()):
            return True
        owner = getattr(obj, "__self__", None)
        return isinstance(owner, _JINJA_HELPERS) and super().is_safe_callable(obj)


_JINJA_HELPERS = (jinja2.runtime.LoopContext, jinja2.utils.Cycler, jinja2.utils.Joiner)

# What templates may read of hpcdist's vocabulary: its names and values, never the module itself.
TEMPLATE_VOCAB = types.MappingProxyType(
    {name: value for name, value in vars(vocab).items() if name.isupper()})


@functools.lru_cache(maxsize=8)
def environment(search: tuple[str, ...]) -> jinja2.Environment:
    env = Sandbox(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(d) for d in search]),
        undefined=jinja2.StrictUndefined,
        # On, so that macro output counts as checked text; finalize refuses every other unfiltered value
        # before any HTML escaping could touch it, and plain tokens hold nothing HTML would escape.
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=finalize,
    )
    env.filters.update(q=quote, sbatch=sbatch_quote, comment=comment, verbatim=verbatim)
    return env


def render_template(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    """One template rendered in ``env``, any failure of a (site's) template a RenderError in one line."""
    try:
        return env.get_template(name).render(context)
    except RenderError:
        raise
    except jinja2.sandbox.SecurityError as exc:
        raise RenderError(f"template {name} reaches outside its values ({_first_line(exc)}); templates may "
                          "only read values and call macros: fix the site template directory") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {_where(exc, name)} uses {exc.name}, which no template directory holds; fix "
                          "that template or add the file to its directory") from None
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {_where(exc, name)}: {_first_line(exc)}; fix that template") from None
    except RecursionError:
        raise RenderError("a template includes itself without end; fix the site template directory") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise RenderError(f"cannot read a template: {_first_line(exc)}; fix the site template directory") from None
    except Exception as exc:  # noqa: BLE001 - a site template's own runtime error (1/0, a bad call)
        raise RenderError(f"a template failed to render: {type(exc).__name__}: {_first_line(exc)}; fix the "
                          "site template directory") from None


def _where(exc: jinja2.TemplateError, name: str) -> str:
    """``path:line`` of the template that failed, which may be one that ``name`` imports or includes."""
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    # Jinja rewrites the traceback so that each template's frame carries its file and line.
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if f.filename.endswith(".j2")), None)
    return f"{frame.filename}:{frame.lineno}" if frame else name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
