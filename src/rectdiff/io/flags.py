"""Range checks of the command line's numeric flags, run right after parsing (before any heavy
import or work), so that ``--rtol -1`` or ``--num 0`` is one line and exit code 2, not a changed
result or a traceback minutes later; ``--debug``, which every subcommand takes; and the parser
whose usage errors (typos, malformed values) are one line too, with the closest known flag."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import EXIT_ERROR, ConfigError

__all__ = ["FLAG_RANGES", "check_flag_ranges", "add_debug_flag", "OneLineParser", "parse_one_line"]


def _count(value: Any) -> bool:
    return isinstance(value, int) and value >= 1


def _count_or_zero(value: Any) -> bool:
    return isinstance(value, int) and value >= 0


def _tolerance(value: Any) -> bool:
    return math.isfinite(value) and value >= 0


def _positive(value: Any) -> bool:
    return math.isfinite(value) and value > 0


def _time(value: Any) -> bool:
    return math.isfinite(value) and 0 <= value <= 1


def _decay(value: Any) -> bool:
    return math.isfinite(value) and 0 <= value < 1


def _seed(value: Any) -> bool:
    return isinstance(value, int) and 0 <= value < 2**32


def _even(value: Any) -> bool:
    return isinstance(value, int) and value >= 2 and value % 2 == 0


#: flag destination -> (allowed range in words, check)
FLAG_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "num": ("an integer >= 1", _count),
    "steps": ("an integer >= 1", _count),
    "teacher_steps": ("an integer >= 1", _count),
    "max_steps": ("an integer >= 1", _count),
    "batch_size": ("an integer >= 1", _count),
    "shard_size": ("an integer >= 1", _count),
    "checkpoint_every": ("an integer >= 0 (0: no checkpoints)", _count_or_zero),
    "keep_checkpoints": ("an integer >= 0 (0: keep all)", _count_or_zero),
    "sample_every": ("an integer >= 0 (0: no samples)", _count_or_zero),
    "sample_steps": ("an integer >= 1", _count),
    "rtol": ("a finite number >= 0", _tolerance),
    "atol": ("a finite number >= 0", _tolerance),
    "lr": ("a finite number > 0", _positive),
    "ts": ("a time in [0, 1] (t = 0 data, t = 1 noise)", _time),
    "seed": ("an integer in [0, 2**32 - 1]", _seed),
    "workers": ("an integer >= 1", _count),
    "warmup_steps": ("an integer >= 0", _count_or_zero),
    "ema_decay": ("a number in [0, 1)", _decay),
    "weight_decay": ("a finite number >= 0", _tolerance),
    "grad_accum": ("an integer >= 1", _count),
    "huber_c": ("a finite number > 0", _positive),
    "lora_rank": ("an integer >= 1 (leave it out for full fine-tuning)", _count),
    "lora_alpha": ("a finite number > 0", _positive),
    "num_workers": ("an integer >= 0 (0: load in the main process)", _count_or_zero),
    "cond_dropout": ("a fraction in [0, 1]", _time),
    "phases": ("an integer >= 1 (1: plain rectification)", _count),
    "phase_start_mass": ("a fraction in [0, 1]", _time),
    "guidance": ("a finite number >= 0 (1: no guidance)", _tolerance),
    "teacher_guidance": ("a finite number >= 0 (1: no guidance)", _tolerance),
    "fit_steps": ("an integer >= 0", _count_or_zero),
    "sample_size": ("an even integer >= 2 (the networks halve it)", _even),
}
#: flags whose destination is not their name
_FLAG_NAMES = {"ts": "--t"}


def _flag(dest: str) -> str:
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def check_flag_ranges(args: argparse.Namespace) -> None:
    """Check every numeric flag of :data:`FLAG_RANGES` that ``args`` holds.

    Raises:
        ConfigError: naming the flag, its value and the allowed range.
    """
    for dest, (allowed, ok) in FLAG_RANGES.items():
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not ok(item):
                raise ConfigError(f"{_flag(dest)} {item}: out of range; allowed: {allowed}.")
    rtol, atol = getattr(args, "rtol", None), getattr(args, "atol", None)
    if rtol == 0 and atol == 0:
        raise ConfigError(
            "--rtol 0 --atol 0: an adaptive solver cannot meet a zero tolerance; "
            "allowed: rtol >= 0 and atol >= 0, at least one > 0."
        )


def add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` on ``parser`` and on every subcommand below it, so that it may be given
    anywhere on the line."""
    parser.add_argument(
        "--debug", action="store_true", default=False if top else argparse.SUPPRESS,
        help="show the traceback of expected errors and of Ctrl-C too",
    )  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                add_debug_flag(child, top=False)


class OneLineParser(argparse.ArgumentParser):
    """A usage error (a typo, a missing or malformed flag) is one line on stderr and exit code
    2, like every other error: argparse's message, which names the flag and the value, and
    the subcommand's ``--help`` to look at, without the usage block. The subcommands'
    parsers are of this class too (``add_subparsers`` makes its parsers of the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The (sub)command parser that ``args`` came from."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return _chosen_parser(action.choices[name], args)
    return parser


def parse_one_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse; an unknown flag is refused by its subcommand, with the closest known flag."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        chosen = _chosen_parser(parser, args)
        known = [s for a in chosen._actions for s in a.option_strings if s.startswith("--")]
        hints = []
        for extra in extras:
            flag = extra.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
            hints += [(close[0], flag)] if close else []
        if len(hints) > 1:
            hint = f" (did you mean {', '.join(f'{c} for {f}' for c, f in hints)}?)"
        else:
            hint = f" (did you mean {hints[0][0]}?)" if hints else ""
        chosen.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args
