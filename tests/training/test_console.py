"""The quiet console: the terminal shows the run header, step lines, events, megatron_tst's
warnings and the summary; megatron-core's and the other libraries' output, their warnings and the
resolved config go to ``<run_dir>/logs/rank<N>.log`` (``--verbose``: the terminal too), kept in
memory until the run may write its directory. Real CLI runs, and the routing in-process."""

import logging
import re
import sys
import textwrap
import warnings

import pytest

from megatron_tst import cli
from megatron_tst.training import console as console_mod
from megatron_tst.training.console import HEADER, Console
from tests.conftest import run_cli

# Both phases, validation at the switch; no checkpoint (a save costs more than the steps).
TST = ["tst.bag_size=2", "tst.superposition_steps=2", "training.train_steps=4",
       "training.eval_interval=2", "checkpoint.save_final=false", "checkpoint.load=none"]
# Library output of every run on a CPU: megatron-core's import-time warnings (Python warnings),
# its dataset and DDP logging records, and the resolved config (megatron_tst, file only).
CHATTER = ["Transformer Engine", "Apex is not installed", "Params for bucket", "GPTDataset",
           "No CUDA runtime", "resolved config:", "UserWarning"]
# Raised by two megatron-core modules each, on both tested lines: recorded once.
TWICE_RAISED = "Transformer Engine and Apex are not installed. Falling back to local " \
               "implementations of multi_tensor_applier and multi_tensor_scale"


def test_quiet_terminal_the_run_log_and_verbose(tiny_recipe, synthetic_data, tmp_path):
    run = tmp_path / "run"
    log_file = run / "logs" / "rank0.log"
    first = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST])
    terminal = first.stdout + first.stderr
    # The header comes first, then the steps (through the phase switch), events and the summary.
    assert first.stdout.startswith("[") and "] run 'tiny': Token-Superposition Training, 4 steps" \
        in first.stdout.splitlines()[0], terminal
    for line in ["  phase 1   superposition, s=2: steps 1-2, 256 data tokens per step "
                 "(2 x 128 positions), 512 in all",
                 "  phase 2   recovery: steps 3-4, 128 data tokens per step, 256 in all",
                 "  layout    world size 1 = TP 1 x PP 1 x DP 1; global batch 4, 2 micro-batches",
                 f"  data      {synthetic_data['train']}; validation {synthetic_data['valid']}"
                 f"; tokenizer sentencepiece {synthetic_data['tokenizer']}\n",
                 f"  run dir   {run}\n", f"  log file  {log_file}: ",
                 "step 1/4 | loss ", "step 2/4 | validation loss",
                 "step 2: phase switch: superposition (s=2) -> recovery after step 2",
                 "step 3/4 | loss ", "step 4/4 | validation loss",
                 "run 'tiny' finished at step 4", "  final training loss"]:
        assert line in terminal, f"{line!r} missing from the terminal:\n{terminal}"
    for chatter in CHATTER:
        assert chatter not in terminal, f"{chatter!r} on the terminal:\n{terminal}"
    assert first.stderr == "", first.stderr

    log = log_file.read_text()
    assert log.startswith("===== ") and log.count("\n===== ") == 0
    for chatter in ["Params for bucket", "GPTDataset", "resolved config:\nname: tiny\n",
                    "UserWarning: Transformer Engine and Apex are not installed",
                    "step 3/4 | loss "]:
        assert chatter in log, f"{chatter!r} missing from {log_file}"
    assert log.count(TWICE_RAISED) == 1
    assert log.count("No CUDA runtime is found") <= 1
    # The header's parameter count (models/sizing.py) is the built model's.
    built = re.search(r"model: ([\d,]+) parameters on this rank", log).group(1)
    assert f"parameters ({built}): 2 layers, hidden 64" in terminal

    # --verbose (a second start in the same run directory): everything on the terminal as well,
    # and the same log file, appended to.
    second = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "--verbose"])
    terminal = second.stdout + second.stderr
    for chatter in ["Transformer Engine", "Params for bucket", "GPTDataset", "resolved config:",
                    "] run 'tiny': Token-Superposition Training", "step 2: phase switch",
                    "step 4/4 | loss ", "run 'tiny' finished at step 4"]:
        assert chatter in terminal, f"{chatter!r} missing with --verbose:\n{terminal}"
    log = log_file.read_text()
    assert log.count(" rank 0 of 1 starts, pid ") == 2
    second_start = log[log.rindex("===== "):]
    assert "--verbose" in second_start.splitlines()[0]
    assert "Params for bucket" in second_start and "step 4/4 | loss " in second_start


def _run_in_process(capsys, args):
    capsys.readouterr()
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr()


def test_a_refused_run_writes_nothing_and_prints_one_paragraph(tiny_recipe, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "refused"
    streams = (sys.stdout, sys.stderr, warnings.showwarning, logging.getLogger().handlers[:])
    rc, out = _run_in_process(capsys, [str(tiny_recipe), f"run_dir={run}",
                                       f"data.train_paths=[{tmp_path / 'missing'}]"])
    assert rc == 2 and out.out == ""
    [line] = out.err.splitlines()
    assert line.startswith("megatron-tst: data error: ") and "missing.bin not found" in line
    assert not run.exists()
    # The console is gone: streams, warnings and the root logger are as they were.
    assert (sys.stdout, sys.stderr, warnings.showwarning,
            logging.getLogger().handlers) == streams
    assert console_mod.current() is None


def test_refused_after_megatron_is_imported(tiny_recipe, tmp_path):
    """The import-time warnings and megatron's records of a run refused inside the trainer stay
    off the terminal, and no log file is written."""
    run = tmp_path / "refused"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "model.vocab_size=50"],
                  check=False)
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    [line] = res.stderr.splitlines()
    assert "model.vocab_size=50: is smaller than the tokenizer's vocabulary" in line
    assert not (run / "logs").exists()


# ------------------------------------------------------------------ routing, in-process
def _module(name: str, source: str) -> dict:
    """Functions whose frames belong to module ``name`` (as a library's would)."""
    namespace = {"__name__": name, "logging": logging, "warnings": warnings}
    exec(compile(textwrap.dedent(source), f"<{name}>", "exec"), namespace)
    return namespace


LIBRARY = _module("megatron.core.fake", """
    def chatter():
        print("a library print")
        logging.getLogger("megatron.core.fake").info("a library record")
        warnings.warn("a library warning", UserWarning)

    def again():  # the same warning from another line
        warnings.warn("a library warning", UserWarning)

    def fails():
        logging.getLogger("megatron.core.fake").error("a library error")
    """)
OURS = _module("megatron_tst.fake", """
    def note():
        logging.getLogger("megatron_tst").info("a set-up note")

    def header():
        logging.getLogger("megatron_tst").info("the header", extra=HEADER)

    def warn():
        logging.getLogger("megatron_tst").warning("an own warning")
        warnings.warn("an own python warning", UserWarning)
    """)
OURS["HEADER"] = HEADER


@pytest.fixture
def console(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MEGATRON_TST_LOG_ALL_RANKS", raising=False)
    made = []

    def make(verbose=False, rank=0, world_size=1):
        c = Console(verbose=verbose).install()
        made.append(c)
        c.world_size = world_size
        c.configure(rank, rank == world_size - 1)
        return c

    yield make
    for c in made:
        c.uninstall()


def _lines(path):
    return path.read_text().splitlines()


def test_routing_before_and_after_the_log_file(console, capsys, tmp_path):
    c = console()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        LIBRARY["chatter"]()
        LIBRARY["again"]()
        OURS["note"]()
        print("our own print")
        OURS["warn"]()
        out = capsys.readouterr()
        # Before the header: the own INFO note waits; prints and own warnings pass.
        assert out.out.startswith("our own print\n") and "] an own warning\n" in out.out
        assert "a library" not in out.out + out.err
        assert "a set-up note" not in out.out
        assert "UserWarning: an own python warning" in out.err
        path = c.open_log(tmp_path / "run")
        OURS["header"]()
        LIBRARY["fails"]()
    out = capsys.readouterr()
    header = out.out.index("the header")
    assert header < out.out.index("a set-up note")  # the header first, then what waited
    assert "a library error" in out.out  # errors of any logger reach the terminal
    lines = _lines(path)
    assert path == tmp_path / "run" / "logs" / "rank0.log" and lines[0].startswith("===== ")
    text = "\n".join(lines)
    for kept in ["stdout megatron.core.fake: a library print", "megatron.core.fake: a library "
                 "record", "UserWarning: a library warning", "a set-up note", "an own warning",
                 "the header", "a library error"]:
        assert kept in text, kept
    assert text.count("a library warning") == 1  # raised from two lines: recorded once
    assert "our own print" not in text  # not library output


def test_appended_across_starts_and_verbose(console, capsys, tmp_path):
    first = console()
    LIBRARY["chatter"]()
    first.open_log(tmp_path)
    first.uninstall()
    second = console(verbose=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        LIBRARY["chatter"]()
    out = capsys.readouterr()
    assert "a library print" in out.out and "a library record" in out.out
    assert "a library warning" in out.err
    second.open_log(tmp_path)
    lines = _lines(tmp_path / "logs" / "rank0.log")
    starts = [i for i, line in enumerate(lines) if line.startswith("===== ")]
    assert len(starts) == 2 and sum("a library print" in x for x in lines[starts[1]:]) == 1


def test_library_stream_handlers_and_other_ranks(console, capsys, tmp_path):
    c = console(rank=0, world_size=2)  # rank 0 of 2 is not the logging rank
    own = logging.getLogger("torch.fake")  # like torch's: its own handler, not propagating
    own.propagate = False
    handler = logging.StreamHandler()  # created now: writes to the console's sys.stderr
    own.addHandler(handler)
    try:
        own.warning("No CUDA runtime is found (a fake)")
        own.warning("No CUDA runtime is found (a fake)")
        own.error("a torch error")
        OURS["note"]()
        OURS["warn"]()
        LIBRARY["fails"]()
    finally:
        own.removeHandler(handler)
    out = capsys.readouterr()
    terminal = out.out + out.err
    assert "No CUDA runtime" not in terminal and "a torch error" in terminal
    assert "a set-up note" not in terminal  # INFO: the logging rank's
    assert "an own warning" in terminal and "a library error" in terminal
    c.open_log(tmp_path)
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert text.count("No CUDA runtime is found (a fake)") == 1 and "a set-up note" in text


def test_a_crash_before_the_log_file_shows_what_was_kept(console, capsys):
    c = console()
    LIBRARY["chatter"]()
    c.crashed(RuntimeError("boom"))
    err = capsys.readouterr().err
    assert err.startswith("megatron-tst: output of the libraries before the error:\n")
    assert "a library record" in err and "a library print" in err


def test_a_crash_after_the_log_file_is_recorded_there(console, capsys, tmp_path):
    c = console()
    path = c.open_log(tmp_path)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        c.crashed(err)
    assert capsys.readouterr().err == f"megatron-tst: the run's log file is {path}\n"
    assert "RuntimeError: boom" in path.read_text()
