"""A worker process that renders callers' chat templates: ``python -I _template_worker.py``.

A per-request ``chat_template`` is code written by whoever holds an API key, so it is
rendered here, not in the server: in Jinja's ``ImmutableSandboxedEnvironment`` (no
attribute of Python's internals, no mutation of what it is given), in a process of its
own with a memory limit, that the server kills when a render outruns its time limit (a
template can loop for hours without calling anything the sandbox could stop). Its output
is counted as it is produced and cut off past the limit the request gives.

It imports only the standard library and Jinja, so it starts in a fraction of a second
and nothing of the server runs in it. The protocol is one JSON object a line each way:
``{"template", "context", "max_chars"}`` in, ``{"text"}`` or ``{"error"}`` out. It prints
``{"ready": true}`` once it can render, and ends when its input does.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any, NoReturn

# The most memory (address space) the worker may map: a template that builds a huge value
# fails with MemoryError instead of taking the machine's memory.
MEMORY_LIMIT_BYTES = 512 * 1024 * 1024
# The longest value ``*`` may build (a string or list times an integer): larger is refused
# before it is built. The output limit still applies to what is printed.
MAX_REPEAT_LENGTH = 1_000_000
# The largest exponent ``**`` may take: 10**10**9 would compute for minutes.
MAX_EXPONENT = 1_000
MAX_ERROR_CHARS = 500
PR_SET_PDEATHSIG = 1


def _limit_memory() -> None:
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(hard, MEMORY_LIMIT_BYTES)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):  # a platform without the limit: the time limit still holds
        pass


def _environment() -> Any:
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        """HF's chat-template environment (trim_blocks, lstrip_blocks, loop controls), with
        access to internals an error instead of an empty string, and ``*`` and ``**`` kept
        from building what no chat prompt needs."""

        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    repeats = isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                    if repeats and len(sequence) * count > MAX_REPEAT_LENGTH:
                        raise SecurityError(f"'*' would build a value longer than {MAX_REPEAT_LENGTH:,}")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"'**' takes exponents up to {MAX_EXPONENT}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> NoReturn:
        # What HF's templates call to refuse a conversation (roles out of order, say).
        raise TemplateError(message)

    environment = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment


def render(environment: Any, template: str, context: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """The rendered text, or why there is none."""
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    try:
        compiled = environment.from_string(template)
        parts: list[str] = []
        length = 0
        for part in compiled.generate(**context):
            length += len(part)
            if length > max_chars:
                return {"error": f"its output is longer than {max_chars:,} characters", "kind": "too_long"}
            parts.append(part)
        return {"text": "".join(parts)}
    except TemplateSyntaxError as exc:
        return {"error": f"syntax error on line {exc.lineno}: {exc.message}"[:MAX_ERROR_CHARS], "kind": "syntax"}
    except SecurityError as exc:
        return {"error": f"{exc}"[:MAX_ERROR_CHARS], "kind": "security"}
    except MemoryError:
        return {"error": "it needs more memory than a template may use", "kind": "memory"}
    except RecursionError:
        return {"error": "it recurses too deeply", "kind": "error"}
    except Exception as exc:  # the template's own error, whatever it is: the caller's to fix
        return {"error": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], "kind": "error"}


def _die_with_parent() -> None:
    """End with the server even if it is killed while a render loops (Linux's
    PR_SET_PDEATHSIG); elsewhere the worker ends when its input closes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main() -> None:
    _die_with_parent()
    _limit_memory()
    environment = _environment()
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = render(environment, request["template"], request["context"], int(request["max_chars"]))
        except MemoryError:
            answer = {"error": "it needs more memory than a template may use", "kind": "memory"}
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"error": f"bad request to the template worker: {type(exc).__name__}", "kind": "protocol"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
