"""Command-line parsing and logging shared by the entry points (``main``, ``benchmark``,
``import_weights``).

``--config.X.Y=V`` overrides are applied by ml_collections while absl parses the flags; an
unknown key there ends in a long traceback. ``parse_flags`` (pass it as ``app.run``'s
``flags_parser``) turns that into one line naming the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

from absl import flags

from configs import base as base_config


class ReadableLog(std_logging.Filter):
    """INFO from this library; only warnings and errors from the libraries under it, and those
    of orbax without their tracebacks: a failed save's background threads each log one, and the
    run's own CheckpointError names the step, the folder and the cause in one line. Orbax's
    warning that a folder opened read-only is read only is dropped."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "diffusion_jax" in record.pathname:
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            record.exc_info, record.exc_text = None, None
            if "directory is read only" in record.getMessage():  # a reader's own choice
                return False
        return record.levelno >= std_logging.WARNING


def dotted_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict or dict: sections and their leaves."""
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if hasattr(value, "items"):
            out += dotted_keys(value, prefix + key + ".")
    return out


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def closest_key(key: str, keys: Sequence[str]) -> str | None:
    """The valid key a mistyped ``key`` most likely meant: in the same section, one whose
    initials or start it is (``optim.lr`` -> ``optim.learning_rate``), else the closest by
    ``difflib.get_close_matches`` over all ``keys`` (but ``key``'s own sections); None when
    nothing is close."""
    section, _, leaf = key.rpartition(".")
    for k in keys:
        parent, _, name = k.rpartition(".")
        if parent == section and (
            _initials(name) == leaf or (len(leaf) >= 2 and name.startswith(leaf))
        ):
            return k
    candidates = [k for k in keys if not key.startswith(k + ".")]
    matches = difflib.get_close_matches(key, candidates, n=1)
    return matches[0] if matches else None


def unknown_key_message(key: str, keys: Sequence[str]) -> str:
    """``unknown config key optim.lr; did you mean optim.learning_rate?``; with nothing close,
    the valid keys of its section."""
    guess = closest_key(key, keys)
    if guess:
        return f"unknown config key {key}; did you mean {guess}?"
    section = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    where = f"in {section}" if section else "at the top level"
    return f"unknown config key {key}; valid keys {where}: {', '.join(siblings)}"


def _config_argument(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{name}(=(.*))?$", arg)
        if m:
            if m.group(1) is not None:
                return m.group(2)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    out = []
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg)
        if m:
            out.append(m.group(1))
    return out


def renamed_key_message(path: str) -> str | None:
    """``config key eval.rd_num_examples is now eval.rate_distortion.num_examples`` for a key
    an earlier version had (``configs/base.py``: ``RENAMED``); None for any other."""
    if path not in base_config.RENAMED:
        return None
    new = base_config.RENAMED[path]
    if new is None:
        return f"config key {path} was removed (see RENAMED in configs/base.py)."
    return f"config key {path} is now {new}: --config.{new}=..."


def _unknown_override_message(path: str, config, keys: Sequence[str]) -> str | None:
    """The message for a dotted override ``path`` that names no key of ``config`` (an earlier
    version's name: its new one); None when it is a key."""
    renamed = renamed_key_message(path)
    if renamed is not None:
        return renamed
    node = config
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "items"):
            leaf = ".".join(parts[:i])
            return f"unknown config key {path}; {leaf} is a value, not a section"
        if part not in node:
            return unknown_key_message(".".join(parts[: i + 1]), keys)
        node = node[part]
    return None


def parse_flags(argv: list[str], config_flag: str = "config") -> list[str]:
    """``flags.FLAGS(argv)``; an unknown ``--config.KEY`` override: one line on stderr, exit 1.

    Other flag errors (a bad value, an unknown flag): their one line, exit 1, as absl's own
    parser does (without its second line of help). A config file that does not exist, or that
    raises or has a syntax error when loaded: one line naming the file (and the line), exit 1."""
    path = _config_argument(argv, config_flag)
    file = path.split(":", 1)[0] if path else None
    if file and not os.path.isfile(file):
        print(f"error: --{config_flag} {path}: no such file {file!r}.", file=sys.stderr)
        sys.exit(1)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = _unknown_override(argv, config_flag) or _config_failure(e, file)
        if message is None:
            raise
    except (flags.Error, ValueError) as e:  # ValueError: a config file refusing its argument
        message = _config_failure(e, file) or _last_line(str(e))
    except Exception as e:  # the config file raised, or does not compile
        message = _config_failure(e, file)
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _last_line(message: str) -> str:
    """A flag error as one line: ml_collections puts the config's own traceback into the message
    of a config file that raised; its last line names the error (a ValueError's message alone:
    the config refusing its argument, in its own words)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if "Traceback (most recent call last)" not in message or not lines:
        return " ".join(message.split())
    return lines[-1].removeprefix("ValueError: ").strip()


def _config_failure(e: BaseException, file: str | None) -> str | None:
    """``the config file F raised T: M (F, line N)`` when ``e`` comes from loading ``file``
    (a frame in it, or a SyntaxError in it); None otherwise."""
    if not file:
        return None
    where = os.path.abspath(file)
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == where:
        return f"the config file {file} does not compile: {e.msg} (line {e.lineno})."
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == where
    ]
    if not frames:
        return None
    text = " ".join(str(e).split())[:300]
    return f"the config file {file} raised {type(e).__name__}: {text} (line {frames[-1].lineno})."


def _unknown_override(argv: Sequence[str], config_flag: str) -> str | None:
    """The message for the first override of ``argv`` that names no key of the loaded config."""
    path = _config_argument(argv, config_flag)
    if path is None:
        return None
    try:
        config = flags.FLAGS[config_flag].parser.parse(path)
    except Exception:  # the config itself does not load: leave the error to absl
        return None
    keys = dotted_keys(config)
    for override in _overrides(argv, config_flag):
        message = _unknown_override_message(override, config, keys)
        if message is not None:
            return message
    return None
