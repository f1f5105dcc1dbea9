"""What every ``ctxcore`` subcommand shares: the one usage-error class, the parser that raises
it, and small formatting helpers."""

from __future__ import annotations

import argparse

__all__ = ["BITS", "UsageError", "fmt_bytes"]

#: ``--bits`` values: the codecs of ``ctxcore.bits_to_pq`` (as ``CompressedCache(bits=...)``).
BITS = (1, 2, 4, 8)


class UsageError(Exception):
    """A problem with the command line or the user's input (options, files, model, server):
    reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def fmt_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
