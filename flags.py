"""Command-line helpers shared by every script: the parser (a usage error is one line and a
hint to ``--help``, not the whole usage), argparse ``type=`` functions that check a
number's allowed range at parse time, the help formatter that shows each flag's default,
the default number of data-loader workers, the flags of a run's plots, and which flags a
command line gave (``parse_given``: a resumed run compares exactly those with its own).

A value out of range stops argparse with one line naming the flag, the value and the
range (exit status 2), before anything is read or created::

    train_search.py: error: argument --init_channels: must be an integer >= 1, got 0
    (python train_search.py --help lists every flag)
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence

# Every script reads its data from here unless --tmp_data_dir / --data says otherwise: the
# release's training and test scripts' folder, beside the checkout.
DEFAULT_DATA_DIR = "../data"


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value
    parse.__name__ = f"integer >= {low}"   # argparse names the type in some messages
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``low..high``."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {text}")
        return value
    parse.__name__ = f"integer in {low}..{high}"
    return parse


def float_range(low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = True) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (open or closed ends)."""
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    where = f"{left}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        value = _number(float, text)
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {where}, got {text}")
        return value
    parse.__name__ = f"number in {where}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
positive_float = float_range(0.0, low_open=True)        # learning rates
nonneg_float = float_range(0.0)                         # weight decay, loss weights, clip (0 = off)
prob = float_range(0.0, 1.0)                            # dropout and drop-path rates: [0, 1)
momentum = float_range(0.0, 1.0)                        # SGD momentum: [0, 1)
fraction = float_range(0.0, 1.0, low_open=True)         # --train_portion: (0, 1)
# --seed: torch.manual_seed takes at most 64 bits, and the training's data order seeds with
# seed + epoch, so 63 bits leave room (a larger seed died in torch with "Overflow").
seed_int = int_between(0, 2 ** 63 - 1)


def run_note(text: str) -> str:
    """--note: one part of the run folder's name ``{kind}-{note}-{time}``, so no path
    separator (``a/b`` made nested folders) and no ``..``."""
    if any(c in text for c in "/\\\0") or ".." in text:
        raise argparse.ArgumentTypeError(
            f"must be a plain name (no path separator, '..' or NUL: it becomes part of the run "
            f"folder's name), got {text}")
    return text


def count_or_fraction(text: str) -> int | float:
    """A count of images (an integer >= 1) or a fraction of them in (0, 1)."""
    value = _number(float, text)
    if 0.0 < value < 1.0:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"must be a count (an integer >= 1) or a fraction in "
                                     f"(0, 1), got {text}")


count_or_fraction.__name__ = "count or fraction"


def available_cpus() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(preferred: int) -> int:
    """The release's number of loader processes, but never more than the CPU cores, and
    none (loading in the main process) on a single core, where a worker process only adds
    the cost of passing every batch between processes."""
    cpus = available_cpus()
    return 0 if cpus <= 1 else min(preferred, cpus)


def workers_help(preferred: int, per_process: bool = False) -> str:
    where = " per process" if per_process else ""
    return (f"data-loader worker processes{where} (default: the release's {preferred}, at most "
            f"the CPU cores, 0 on one core; here {default_workers(preferred)})")


PLOT_FORMATS = ("png", "svg")


def add_plot_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--plot_format`` of the scripts that draw their run's plots at the end."""
    parser.add_argument("--plot_format", choices=[*PLOT_FORMATS, "none"], default="png",
                        help="format of the plots drawn at the end of the run (needs matplotlib); "
                             "none: draw no plots")


def parse_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                ) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parse ``argv`` and name the flags (their ``dest``) it gave, whatever their values:
    ``--learning_rate 0.025`` is given even where 0.025 is the default. The names come
    from a second parse in which no flag has a default, so only what the command line
    set is there."""
    args = parser.parse_args(argv)
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = frozenset(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
    return args, given


class HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after a flag's help unless the default is None/False/suppressed
    or the text already says it (those help texts state their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not quiet and action.option_strings and "(default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the project's error style: a bad command line prints the one
    line that says what is wrong and a hint to ``--help`` (exit status 2), not the whole
    usage (25 lines for the search) above it."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        hint = f"(python {self.prog} --help lists every flag)"
        self.exit(2, f"{self.prog}: error: {message}\n{hint}\n")
