"""The console of a training run: a quiet terminal, and a log file per rank for everything else.

The terminal shows what a user reads: the run header, one line per log interval, events
(validation, phase switch, checkpoints, resume), warnings and errors of ``megatron_tst``, and the
summary. Everything else that a run prints (megatron-core's logging records, Python warnings of
the libraries, ``print`` output of megatron-core and wandb, torch's own log handler, the resolved
config) goes to ``<run_dir>/logs/rank<N>.log``, appended across resumes with a separator line per
start. ``--verbose`` shows all of it on the terminal too, as without this module.

``megatron-tst train`` installs the ``Console`` before megatron-core or torch is imported (their
warnings fire at import) and keeps the records in memory until the run directory may be written:
nothing is written there before the checks that can refuse the run have passed
(``Trainer._announce`` opens the file, ``open_run_log``). A refused run writes no log file and
prints only its one-paragraph error (with ``--verbose`` the records were on the terminal already);
a crash before the file is open prints the kept records to stderr before the traceback.

Routing, per record:

- logging records of ``megatron_tst``: the terminal from INFO on the logging rank (the last one,
  or every rank with ``MEGATRON_TST_LOG_ALL_RANKS``), from WARNING on the others; the file;
- logging records of any other logger: the file; the terminal only from ERROR (or ``--verbose``);
- Python warnings: raised in ``megatron_tst`` code, stderr and the file; others the file only,
  each distinct message once (megatron-core warns "Transformer Engine and Apex are not installed"
  from several modules);
- writes to ``sys.stdout``/``sys.stderr`` made by megatron-core, wandb, transformer-engine or apex
  (``print``, ``click.echo``) or by a library's own ``logging.StreamHandler`` (torch installs one
  that does not propagate): the file, line by line; anything else (the summary, tracebacks) passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, TextIO

PACKAGE = "megatron_tst"
LOG_DIR = "logs"
# ``log.info(..., extra=FILE_ONLY)``: the log file (and the terminal with --verbose) only.
FILE_ONLY = {"console": "file"}
# ``log.info(header, extra=HEADER)``: the run header. INFO lines of megatron_tst logged before it
# (set-up notes) reach the terminal after it, so that a run's output starts with its header.
HEADER = {"console": "header"}
# Modules whose own writes to stdout/stderr are library output (print, click.echo); megatron_tst
# does not match "megatron." and passes.
LIBRARY_MODULES = ("megatron.", "wandb", "transformer_engine", "apex")
# Frames between a write and the code that asked for it.
_PLUMBING = ("logging", "warnings", "click", "codecs", "io", "_io", "contextlib", "threading",
             "wandb.sdk.lib.console_capture", "wandb.sdk.lib.redirect", __name__)

_current: Optional["Console"] = None


def current() -> Optional["Console"]:
    """The installed console, if any."""
    return _current


def _own(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _is_plumbing(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _PLUMBING)


class _TerminalStream:
    """``sys.stdout``/``sys.stderr`` while a console is installed: library writes are diverted to
    the log file (and passed on too with --verbose); all other writes pass unchanged."""

    def __init__(self, console: "Console", name: str, stream: TextIO):
        self._console, self._name, self._stream = console, name, stream

    def write(self, text: str) -> int:
        console = self._console
        if console.passing or not text:
            return self._stream.write(text)
        origin = _origin()
        if origin is None:
            return self._stream.write(text)
        if isinstance(origin, logging.LogRecord):  # a library's own StreamHandler
            shown = console.library_record(origin)
        else:
            console.library_output(self._name, origin, text)
            shown = console.verbose
        return self._stream.write(text) if shown else len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def _origin():
    """What asked for the current write: the LogRecord of a ``logging.StreamHandler.emit`` of
    another package, the name of a library module in ``LIBRARY_MODULES``, or None (pass it)."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # no Python caller (the interpreter's own traceback printing)
        return None
    emit = logging.StreamHandler.emit.__code__
    for _ in range(40):
        if frame is None:
            return None
        if frame.f_code is emit:
            record = frame.f_locals.get("record")
            if isinstance(record, logging.LogRecord) and not _own(record.name):
                return record
            return None
        module = frame.f_globals.get("__name__") or ""
        if not _is_plumbing(module):
            return module if module.startswith(LIBRARY_MODULES) else None
        frame = frame.f_back
    return None


def _warning_issuer() -> str:
    """The module that called ``warnings.warn`` (not the frame its ``stacklevel`` names, which
    for a library warning can be megatron_tst code calling the library)."""
    frame = sys._getframe(2)
    while frame is not None and _is_plumbing(frame.f_globals.get("__name__") or ""):
        frame = frame.f_back
    return (frame.f_globals.get("__name__") or "") if frame is not None else ""


class _Handler(logging.Handler):
    """The root logger's one handler while a console is installed."""

    def __init__(self, console: "Console"):
        super().__init__(logging.NOTSET)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.record(record)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


class Console:
    def __init__(self, verbose: bool = False, streams: bool = True):
        self.verbose = verbose
        self.started = time.time()
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.is_logging_rank = self.rank == self.world_size - 1
        self.path: Optional[Path] = None
        self._file: Optional[TextIO] = None
        self._pending: list[str] = []  # file lines kept until the run directory may be written
        self._partial: dict[str, str] = {}  # an unfinished library line per stream
        self._seen: set = set()  # library warnings already recorded (each once)
        self._deferred: Optional[list[str]] = [] if not verbose else None  # until the header
        self._lock = threading.RLock()
        self._local = threading.local()
        self._streams = streams
        self._saved = None
        self._handler = _Handler(self)
        self._showwarning_orig = warnings.showwarning
        self._configure_formats()

    # -------------------------------------------------------------------- installation
    def install(self) -> "Console":
        global _current
        root = logging.getLogger()
        self._saved = (root.handlers[:], root.level, warnings.showwarning, sys.stdout, sys.stderr)
        self._showwarning_orig = warnings.showwarning
        for h in root.handlers[:]:
            root.removeHandler(h)
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        warnings.showwarning = self._showwarning
        if self._streams:
            sys.stdout = _TerminalStream(self, "stdout", sys.stdout)
            sys.stderr = _TerminalStream(self, "stderr", sys.stderr)
        _current = self
        return self

    def uninstall(self) -> None:
        """Restore logging, warnings and the streams as they were; close the log file."""
        global _current
        if self._saved is None:
            return
        handlers, level, showwarning, stdout, stderr = self._saved
        self._saved = None
        self._finish_partial()
        root = logging.getLogger()
        root.removeHandler(self._handler)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = showwarning
        if self._streams:
            sys.stdout, sys.stderr = stdout, stderr
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if _current is self:
            _current = None

    def configure(self, rank: int, is_logging_rank: bool) -> None:
        self.rank, self.is_logging_rank = rank, is_logging_rank
        self._configure_formats()
        if not is_logging_rank:  # the header is the logging rank's: nothing waits for it here
            with self._lock:
                deferred, self._deferred = self._deferred or [], None
            if deferred:
                self._to_terminal("".join(deferred), sys.stdout)

    def _configure_formats(self) -> None:
        self._terminal_format = logging.Formatter(f"[%(asctime)s rank{self.rank}] %(message)s",
                                                  datefmt="%H:%M:%S")
        self._file_format = logging.Formatter(
            f"[%(asctime)s rank{self.rank}] %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S")

    def _shown(self, record: logging.LogRecord) -> bool:
        """Whether a record reaching the root logger is shown on this rank's terminal."""
        all_ranks = bool(os.environ.get("MEGATRON_TST_LOG_ALL_RANKS"))
        if self.verbose:  # as without the console: INFO on rank 0 and the logging rank
            info = self.rank == 0 or self.is_logging_rank or all_ranks
            return record.levelno >= (logging.INFO if info else logging.WARNING)
        if getattr(record, "console", None) == "file":
            return False
        if _own(record.name):
            info = self.is_logging_rank or all_ranks
            return record.levelno >= (logging.INFO if info else logging.WARNING)
        return record.levelno >= logging.ERROR

    def adopt_library_handlers(self) -> None:
        """Divert the terminal handlers that libraries attached to their own non-propagating
        loggers before this console was installed (the CLI installs it first, so this is for
        runs started from Python): their records go to the file, the terminal only from ERROR
        (or --verbose)."""
        terminals = {sys.__stdout__, sys.__stderr__}
        if self._saved is not None:
            terminals |= {self._saved[3], self._saved[4]}
        for logger in list(logging.Logger.manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger) or logger.propagate or _own(logger.name):
                continue
            for h in logger.handlers:
                if (type(h) is logging.StreamHandler and getattr(h, "stream", None) in terminals
                        and not any(isinstance(f, _Divert) for f in h.filters)):
                    h.addFilter(_Divert(self))

    # ----------------------------------------------------------------------- routing
    @property
    def passing(self) -> bool:
        return getattr(self._local, "passing", False)

    @contextlib.contextmanager
    def _passing(self):
        self._local.passing = True
        try:
            yield
        finally:
            self._local.passing = False

    def record(self, record: logging.LogRecord) -> None:
        """A record that reached the root logger."""
        if not _own(record.name) and not self._first(record):
            return
        self._write_file(self._file_format.format(record))
        if not self._shown(record):
            return
        text = self._terminal_format.format(record) + "\n"
        with self._lock:
            if getattr(record, "console", None) == "header":
                deferred, self._deferred = self._deferred or [], None
                text += "".join(deferred)
            elif self._deferred is not None and record.levelno < logging.WARNING:
                self._deferred.append(text)
                return
        self._to_terminal(text, sys.stdout)

    def library_record(self, record: logging.LogRecord) -> bool:
        """A record a library's own stream handler is writing: to the file; whether the handler's
        output should reach the terminal as well."""
        if self._first(record):
            self._write_file(self._file_format.format(record))
        return self.verbose or record.levelno >= logging.ERROR

    def library_output(self, stream: str, module: str, text: str) -> None:
        """Text a library printed: to the file, by whole lines."""
        with self._lock:
            text = self._partial.pop(stream, "") + text
            *lines, rest = text.split("\n")
            if rest:
                self._partial[stream] = rest
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in lines:
                self._write_file(f"[{stamp} rank{self.rank}] {stream} {module}: {line}")

    def _finish_partial(self) -> None:
        with self._lock:
            for stream, rest in list(self._partial.items()):
                self.library_output(stream, "(unfinished line)", rest + "\n")
            self._partial.clear()

    def _first(self, record: logging.LogRecord) -> bool:
        """Whether a library's WARNING record is new (each distinct one is recorded once)."""
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if file is not None:  # written to a given file: not ours to route
            return self._showwarning_orig(message, category, filename, lineno, file, line)
        own = _own(_warning_issuer())
        if not own:
            key = (category, str(message))
            with self._lock:
                if key in self._seen:
                    return
                self._seen.add(key)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write_file(f"[{stamp} rank{self.rank}] WARNING py.warnings: {filename}:{lineno}: "
                         f"{category.__name__}: {message}")
        if own or self.verbose:  # as Python prints it
            self._to_terminal(warnings.formatwarning(message, category, filename, lineno, line),
                              sys.stderr)

    def _to_terminal(self, text: str, stream: TextIO) -> None:
        with self._lock, self._passing():
            stream.write(text)
            stream.flush()

    def _write_file(self, line: str) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
            else:
                self._pending.append(line)

    # ------------------------------------------------------------------------ the file
    def open_log(self, run_dir: str | Path) -> Path:
        """Start ``<run_dir>/logs/rank<N>.log`` (appended to): a separator line, the records kept
        so far, then every record as it comes."""
        path = Path(run_dir) / LOG_DIR / f"rank{self.rank}.log"
        with self._lock:
            if self._file is not None and self.path == path:
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            new = open(path, "a", encoding="utf-8", errors="replace")
            if self._file is not None:
                self._file.close()
            self._file, self.path = new, path
            started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
            self._file.write(f"===== {started}: rank {self.rank} of {self.world_size} starts, pid "
                             f"{os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)} "
                             f"=====\n")
            for line in self._pending:
                self._file.write(line + "\n")
            self._pending.clear()
            self._file.flush()
        return path

    def crashed(self, err: BaseException) -> None:
        """An error that ends the run with a traceback (Python prints it next). Once the log
        file is open, the traceback goes there too and stderr names the file; before, the records
        kept so far go to stderr (they may explain the error; with --verbose they were shown)."""
        self._finish_partial()
        with self._lock:
            opened = self._file is not None
            pending, self._pending = ([], self._pending) if opened else (self._pending, [])
        if opened:
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._write_file(f"[{stamp} rank{self.rank}] ERROR megatron_tst: the run failed:\n"
                             f"{text.rstrip()}")
            self._to_terminal(f"megatron-tst: the run's log file is {self.path}\n", sys.stderr)
        elif pending and not self.verbose:
            self._to_terminal("megatron-tst: output of the libraries before the error:\n"
                              + "".join(line + "\n" for line in pending), sys.stderr)


class _Divert(logging.Filter):
    """On a library's own terminal handler: the record to the file; printed from ERROR (or
    always with --verbose)."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        if current() is not self.console:
            return True
        return self.console.library_record(record)


@contextlib.contextmanager
def capture(verbose: bool = False):
    """The console for one ``megatron-tst train``: install, run, uninstall. An uncaught error
    other than a refusal (``InputError``) is recorded with ``Console.crashed``."""
    from megatron_tst.config.errors import InputError

    console = Console(verbose=verbose).install()
    try:
        yield console
    except InputError:
        raise
    except Exception as err:
        console.crashed(err)
        raise
    finally:
        console.uninstall()


def setup_logging(rank: int, is_logging_rank: bool) -> Console:
    """The rank's console: the one ``megatron-tst train`` installed, or (a run started from
    Python) a new one without stream capture."""
    console = current() or Console(streams=False).install()
    console.configure(rank, is_logging_rank)
    console.adopt_library_handlers()
    return console


def open_run_log(cfg) -> Optional[Path]:
    """Open this rank's log file in ``cfg``'s run directory (once the run may write there)."""
    console = current()
    return console.open_log(cfg.resolved_run_dir) if console is not None else None


# ------------------------------------------------------------------------------ the header
def _short(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:g}"


def _paths(paths: list[str], most: int = 3) -> str:
    shown = ", ".join(str(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def run_header(cfg, plan, log_path: Optional[Path]) -> str:
    """The lines a run starts with: model and parameters, layout, phases with their steps and
    data tokens, data, run directory and log file, versions."""
    import torch

    from megatron_tst import mcore
    from megatron_tst.models.sizing import parameter_counts

    m, t, d, lay = cfg.model, cfg.training, cfg.data, plan.layout
    sched, stream = plan.schedule, plan.stream
    counts = parameter_counts(cfg, plan.padded_vocab_size)
    params = f"{_short(counts.total)} parameters ({counts.total:,})"
    arch = f"{m.num_layers} layers, hidden {m.hidden_size}"
    if m.num_moe_experts:
        params += f", {_short(counts.active)} active per token"
        arch += f", {m.num_moe_experts} experts (top-{m.moe_router_topk})"
    arch += (f", sequence {m.seq_length}, vocab {plan.vocab_size:,} "
             f"(padded {plan.padded_vocab_size:,})")
    method = "Token-Superposition Training" if sched.is_tst else "next-token training"
    lines = [f"run '{cfg.name}': {method}, {t.train_steps:,} steps",
             f"  model     {params}: {arch}"]
    vp = f" (x{lay.vp} virtual)" if lay.vp else ""
    ep = f", EP {lay.ep}" if lay.ep > 1 else ""
    micro = "micro-batch" if lay.num_microbatches == 1 else "micro-batches"
    lines.append(f"  layout    world size {lay.world_size} = TP {lay.tp} x PP {lay.pp}{vp} x DP "
                 f"{lay.dp}{ep}; global batch {lay.global_batch_size}, "
                 f"{lay.num_microbatches} {micro} of {lay.micro_batch_size} per step")
    positions = t.global_batch_size * m.seq_length
    segments = []
    if sched.is_tst:
        segments.append((1, sched.superposition_steps, sched.phase(0)))
    if sched.superposition_steps < t.train_steps or not sched.is_tst:
        first = sched.superposition_steps + 1 if sched.is_tst else 1
        segments.append((first, t.train_steps, sched.phase(t.train_steps - 1)))
    for i, (a, b, phase) in enumerate(segments, 1):
        tokens = stream.step_tokens(phase)
        if phase.bag_size > 1:
            what = (f"superposition, s={phase.bag_size}: steps {a:,}-{b:,}, {tokens:,} data tokens "
                    f"per step ({phase.bag_size} x {positions:,} positions)")
        else:
            what = (f"{'recovery' if sched.is_tst else 'next-token'}: steps {a:,}-{b:,}, "
                    f"{tokens:,} data tokens per step")
        label = f"phase {i}" if sched.is_tst else "steps"
        lines.append(f"  {label:<9} {what}, {_short(tokens * (b - a + 1))} in all")
    if d.source == "demo":
        data = (f"the bundled demo corpus, prepared under {Path(cfg.resolved_run_dir) / 'data'} "
                f"(tokenizer of {d.demo_vocab_size:,} pieces)")
    else:
        weights = f" (weights {', '.join(f'{w:g}' for w in d.train_weights)})" \
            if d.train_weights else ""
        valid = (f"; validation {_paths(d.valid_paths)}" if d.valid_paths
                 else "; validation: 2% of each training dataset")
        data = (f"{_paths(d.train_paths)}{weights}{valid}; tokenizer {d.tokenizer.type} "
                f"{d.tokenizer.path}")
    lines.append(f"  data      {data}")
    lines.append(f"  run dir   {cfg.resolved_run_dir}")
    if log_path is not None:
        where = (str(log_path) if lay.world_size == 1 else
                 f"{log_path.parent}/rank<N>.log (one per rank)")
        lines.append(f"  log file  {where}: library output, warnings, the resolved config"
                     f"{'' if current() and current().verbose else ' (--verbose shows them here)'}")
    lines.append(f"  software  megatron-core {mcore.installed()}, torch {torch.__version__}, "
                 f"Python {mcore.python_line()}, {plan.transformer_impl} transformer spec")
    return "\n".join(lines)
