"""Errors a grammar raises for a client's input, each naming the part of it at fault."""

from __future__ import annotations

Path = tuple[str | int, ...]


def render_path(path: Path) -> str:
    """("tools", 0, "function", "parameters") -> "tools[0].function.parameters"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class GrammarError(ValueError):
    """An invalid or unsupported schema (or tool list). `path` leads from the spec's root (or
    from the `base` a check was given) to the offending part, for a 400 that names it."""

    def __init__(self, message: str, path: Path = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = tuple(path)

    @property
    def param(self) -> str:
        return render_path(self.path)

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.path else self.message


class GrammarLimitError(GrammarError):
    """A spec over one of the server's grammar limits; `limit` is the limit's setting name
    (`max_grammar_bytes`, `grammar_compile_timeout`), which the server turns into its flag."""

    def __init__(self, message: str, limit: str, path: Path = ()) -> None:
        super().__init__(message, path)
        self.limit = limit


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow reached a matcher: the mask was not applied (an
    engine bug, not the client's)."""
