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
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Every script reads its data from here unless --tmp_data_dir / --data says otherwise:
# beside the checkout. Deviation: the release's test.py default; its search and training
# scripts default to /tmp/cache/.
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


def whole_number_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``, also written as a float with nothing after the point
    (``50.0``): the release parses --report_freq as a float."""
    def parse(text: str) -> int:
        value = _number(float, text)
        if value != int(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} (50 or 50.0), got {text}")
        return int(value)
    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
# --report_freq: a float in the release's scripts (its command lines pass 50.0). Deviation:
# a fraction (12.5) is refused; the release's step % 12.5 == 0 would report every 25 steps.
report_steps = whole_number_at_least(1)
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
    usage (25 lines for the search) above it. Prefix matching is off: argparse would take
    ``--epoch 1`` as ``--epochs 1`` (and a future flag could change what a prefix means);
    an unknown flag is refused with the nearest known ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Deviation: the release's parsers match prefixes (argparse's default).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        if message.startswith("unrecognized arguments:"):
            message += self._suggestions(message.split(":", 1)[1].split())
        hint = f"(python {self.prog} --help lists every flag)"
        self.exit(2, f"{self.prog}: error: {message}\n{hint}\n")

    def _suggestions(self, words: list[str]) -> str:
        known = [o[2:] for a in self._actions for o in a.option_strings if o.startswith("--")]
        said = []
        for word in words:
            flag = word.split("=", 1)[0]
            close = (difflib.get_close_matches(flag[2:], known, n=2, cutoff=0.75)
                     if flag.startswith("--") else [])
            if close:
                said.append(f"{flag}: did you mean {' or '.join('--' + c for c in close)}?")
        return f" ({'; '.join(said)})" if said else ""


# ---------------------------------------------------------------------------------------
# Presets: flags whose default depends on --demo
# ---------------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def add_presets(parser: argparse.ArgumentParser, paper: Mapping[str, Any],
                demo: Mapping[str, Any]) -> None:
    """Let the flags named in ``paper`` default to None on the command line (= not given),
    to be resolved by the script from its presets table, and show both defaults in their help. An on/off
    flag gets a ``--no-FLAG`` too, so that a preset that turns it on can be turned off."""
    for action in list(parser._actions):
        if action.dest not in paper:
            continue
        both = f"default {_shown(paper[action.dest])}, demo {_shown(demo[action.dest])}"
        text = action.help or ""
        if "(default" in text:      # a help that states its default in words
            action.help = text[:-1] + f"; demo {_shown(demo[action.dest])})" if text.endswith(")") else text
        else:
            action.help = f"{text} ({both})"
        action.default = None
        if isinstance(action, argparse._StoreTrueAction):
            flag = action.option_strings[0]
            group = next((g for g in parser._action_groups if action in g._group_actions), parser)
            group.add_argument(f"--no-{flag[2:]}", dest=action.dest, action="store_false",
                               default=None, help=f"turn {flag} off (on with --demo)")


# ---------------------------------------------------------------------------------------
# The release's flags that change nothing here
# ---------------------------------------------------------------------------------------

# Deviation: accepted so that the release's command lines run, but without effect; the log
# says that each one given had no effect, and why.
NO_EFFECT = {
    "gpu": "the device comes from --device (auto: CUDA when available); choose the GPU with "
           "CUDA_VISIBLE_DEVICES=N, several with torchrun",
}


def add_no_effect_flags(parser, reasons: Mapping[str, str] = NO_EFFECT,
                        switches: tuple[str, ...] = ()) -> None:
    """Flags of the release that are parsed and never used (``--gpu N``; test.py's
    ``--cutout``, one of the on/off ``switches``, and ``--cutout_length``). Their default,
    None, means not given."""
    for dest, reason in reasons.items():
        kind = dict(action="store_true") if dest in switches else dict(metavar="N")
        parser.add_argument(f"--{dest}", default=None, help=f"the release's flag; no effect: {reason}",
                            **kind)


def no_effect_lines(args: argparse.Namespace, reasons: Mapping[str, str] = NO_EFFECT) -> list[str]:
    """One log line per no-effect flag that was given."""
    return [f"--{dest}{'' if value is True else f' {value}'} has no effect here: {reasons[dest]}"
            for dest in reasons if (value := getattr(args, dest, None)) not in (None, False)]
