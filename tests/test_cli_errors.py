"""Every command refuses every bad value of every option with one line and leaves no trace.

The cases are generated from the parsers: for each command in :data:`qwenlite.cli.COMMANDS`
(and each of its subcommands), each option is given each value its argparse type says it refuses
(``type.bad_values``; for choices, values that are not one). A command must exit with status 2,
print a line or two with ``error:`` naming the option and no traceback, and leave the sandbox it
ran in (its working directory, cache, ledger and home) exactly as it was. The commands run in
process; the cases of issue 17 also run as real subprocesses.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from qwenlite import cli
from qwenlite.errors import QwenliteError

# ----- the cases, from the parsers ----------------------------------------------------------------
NOT_A_CHOICE = ("", "not-a-choice")
MIN_CASES = 400  # a floor: the walk must not silently shrink (it tried 463 when written)


def _parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser) for a parser and, recursively, each of its subcommands."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def _value_options(parser: argparse.ArgumentParser):
    """The actions of ``parser`` that take a value (not flags, help or subcommands)."""
    for action in parser._actions:
        if action.nargs == 0 or isinstance(action, argparse._SubParsersAction):
            continue
        yield action


def _bad_values(action: argparse.Action) -> tuple[str, ...] | None:
    """What the action refuses: its type's ``bad_values``, or non-choices; None if unchecked."""
    if action.choices is not None:
        return NOT_A_CHOICE
    return getattr(action.type, "bad_values", None) or None


def _argv(prefix: tuple[str, ...], action: argparse.Action, value: str) -> list[str]:
    if not action.option_strings:
        return [*prefix, value]
    option = max(action.option_strings, key=len)
    return [*prefix, f"{option}={value}"]  # "=": values such as "-inf" or "" stay values


def walk():
    """Every (command, argv, option, bad value template) and the options left unchecked."""
    cases, unchecked = [], []
    for name in cli.COMMANDS:
        module = importlib.import_module(f"qwenlite.{name}")
        for prefix, parser in _parsers(module.build_parser()):
            for action in _value_options(parser):
                option = max(action.option_strings, key=len, default=action.dest)
                bad = _bad_values(action)
                if bad is None:
                    unchecked.append(" ".join([name, *prefix, option]))
                    continue
                cases += [(name, prefix, action, value) for value in bad]
    return cases, unchecked


CASES, UNCHECKED = walk()


def _case_id(case) -> str:
    name, prefix, action, value = case
    return " ".join([name, *_argv(prefix, action, repr(value))])


# ----- the sandbox ------------------------------------------------------------------------------
class Sandbox:
    """A temporary working directory holding a file, a directory and (where the user can be
    refused a write) an unwritable directory, with every path a command may default to inside."""

    def __init__(self, root: Path):
        self.root = root
        (root / "file.txt").write_text("not a directory\n")
        (root / "dir").mkdir()
        readonly = root / "readonly"
        readonly.mkdir()
        readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
        if not os.access(readonly, os.W_OK):
            self.unwritable = readonly
        elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):  # root
            self.unwritable = Path("/proc/sys")
        else:
            self.unwritable = None
        self.places = {"missing": root / "missing", "file": root / "file.txt",
                       "dir": root / "dir", "unwritable": self.unwritable}
        assert set(self.places) == set(cli.PATH_PLACEHOLDERS)
        self.env = {"QWENLITE_CACHE": root / "cache", "QWENLITE_LEDGER": root / "ledger.json",
                    "HF_HOME": root / "hf", "HOME": root / "home", "HF_HUB_OFFLINE": "1"}

    def fill(self, template: str) -> str | None:
        """The bad value with the sandbox's paths; None if it needs a place this machine lacks."""
        if "{unwritable}" in template and self.unwritable is None:
            return None
        return template.format(**self.places)

    def snapshot(self) -> dict:
        """Every path under the sandbox with its type, size and modification time."""
        out = {}
        for path in [self.root, *self.root.rglob("*")]:
            st = path.lstat()
            out[str(path.relative_to(self.root))] = (stat.S_IFMT(st.st_mode), st.st_size,
                                                     st.st_mtime_ns)
        return out

    def close(self) -> None:
        (self.root / "readonly").chmod(stat.S_IRWXU)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(tmp_path_factory.mktemp("cli_errors"))
    yield box
    box.close()


@pytest.fixture
def in_sandbox(sandbox, monkeypatch):
    """Run in the sandbox, with nothing of the real machine to fall back on: no weights, no
    download, no simulation, no model loading (a case that gets that far fails loudly)."""
    monkeypatch.chdir(sandbox.root)
    for key, value in sandbox.env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("QWENLITE_WEIGHTS", raising=False)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def past_the_checks(*args, **kwargs):
        raise AssertionError("a refused command got past its checks (loading, downloading or "
                             "simulating)")

    import qwenlite.data
    import qwenlite.download
    import qwenlite.hub
    import qwenlite.model.loading

    for module, name in ((qwenlite.model.loading, "load_model"), (qwenlite.hub, "download"),
                         (qwenlite.download, "download"), (qwenlite.data, "simulate")):
        monkeypatch.setattr(module, name, past_the_checks)
    return sandbox


def run_in_process(command: str, argv: list[str], capsys) -> tuple[int, str]:
    """``python -m qwenlite.<command> argv`` in this process: (exit status, stderr)."""
    module = importlib.import_module(f"qwenlite.{command}")
    try:
        code = module.main(argv)
    except SystemExit as exc:  # a command whose main lets argparse exit
        code = exc.code
    return code, capsys.readouterr().err


def assert_refused(code, err: str, mentions: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit status {code}, stderr {err!r}"
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2 and any(line.startswith("error: ") for line in lines), err
    assert mentions in err, f"the error does not name {mentions}: {err!r}"


# ----- the walk -----------------------------------------------------------------------------------
def test_every_option_has_a_checking_type():
    """A new option with a plain int/float/str type (or none) fails here: give it a type from
    qwenlite.cli (or choices), so the walk below can try what it refuses."""
    assert not UNCHECKED, f"options without a checking type: {UNCHECKED}"


def test_the_walk_covers_every_command(capsys):
    commands = {case[0] for case in CASES}
    assert commands == set(cli.COMMANDS)
    with capsys.disabled():
        print(f"\n{len(CASES)} (command, option, bad value) cases over {len(commands)} commands")
    assert len(CASES) >= MIN_CASES


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_value_is_refused_in_one_line_and_leaves_nothing(case, in_sandbox, capsys):
    command, prefix, action, template = case
    value = in_sandbox.fill(template)
    if value is None:
        pytest.skip("no directory here that the user cannot write to")
    before = in_sandbox.snapshot()
    code, err = run_in_process(command, _argv(prefix, action, value), capsys)
    assert_refused(code, err, mentions=max(action.option_strings, key=len, default=action.dest))
    assert in_sandbox.snapshot() == before, "the refused command changed the file system"


# ----- the cases of issue 17, and others past the parser --------------------------------------------
ISSUE_CASES = {
    "train --out FILE": ("train", ["--out", "{file}"], "--out"),
    "evaluate --out FILE": ("evaluate", ["--out", "{file}"], "--out"),
    "train --ledger DIR": ("train", ["--ledger", "{dir}"], "--ledger"),
    "train --seed -1": ("train", ["--seed", "-1"], "--seed"),
    "evaluate --seed -1": ("evaluate", ["--seed", "-1"], "--seed"),
    "evaluate --temperature nan": ("evaluate", ["--temperature", "nan"], "--temperature"),
    "evaluate --samples 3 --temperature nan": ("evaluate", ["--samples", "3", "--temperature",
                                                            "nan"], "--temperature"),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_issue_cases_in_process(name, in_sandbox, capsys):
    command, argv, option = ISSUE_CASES[name]
    before = in_sandbox.snapshot()
    code, err = run_in_process(command, [in_sandbox.fill(a) for a in argv], capsys)
    assert_refused(code, err, mentions=option)
    assert in_sandbox.snapshot() == before


def _subprocess(sandbox: Sandbox, command: str, argv: list[str], **env) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in ("QWENLITE_WEIGHTS",
                                                                   cli.DEBUG_ENV)}
    full_env.update({k: str(v) for k, v in sandbox.env.items()}, PYTHONPATH=str(ROOT / "src"),
                    **env)
    return subprocess.Popen([sys.executable, "-m", f"qwenlite.{command}", *argv],
                            cwd=sandbox.root, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory):
    """The issue's cases and the debug switch as real ``python -m`` processes, all started at
    once (each pays for importing torch), each in a sandbox of its own."""
    runs = dict(ISSUE_CASES)
    runs["budget, corrupt ledger, QWENLITE_DEBUG=1"] = ("budget", [], "ledger")
    boxes, procs = {}, {}
    for i, (name, (command, argv, _)) in enumerate(runs.items()):
        box = boxes[name] = Sandbox(tmp_path_factory.mktemp(f"proc{i}"))
        if command == "budget":
            Path(box.env["QWENLITE_LEDGER"]).write_text("{not json")
        debug = {cli.DEBUG_ENV: "1"} if "DEBUG" in name else {}
        before = box.snapshot()
        procs[name] = (_subprocess(box, command, [box.fill(a) for a in argv], **debug), before)
    out = {}
    for name, (proc, before) in procs.items():
        _, err = proc.communicate(timeout=300)
        out[name] = (proc.returncode, err, boxes[name].snapshot() == before)
        boxes[name].close()
    return out


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_issue_cases_as_subprocesses(name, subprocess_runs):
    code, err, unchanged = subprocess_runs[name]
    assert_refused(code, err, mentions=ISSUE_CASES[name][2])
    assert unchanged, "the refused command changed the file system"


def test_debug_switch_shows_the_traceback(subprocess_runs):
    """(Without the switch a corrupt ledger is one line: the test of $QWENLITE_LEDGER below.)"""
    code, err, unchanged = subprocess_runs["budget, corrupt ledger, QWENLITE_DEBUG=1"]
    assert code != 0 and "Traceback" in err and "QwenliteError" in err and "corrupt" in err
    assert unchanged


@pytest.mark.parametrize("env_ledger", ["dir", "corrupt"])
def test_a_bad_ledger_from_the_environment_is_refused_before_anything_is_written(
        env_ledger, in_sandbox, monkeypatch, capsys):
    """$QWENLITE_LEDGER is not parsed by argparse: train and evaluate check it first."""
    ledger = in_sandbox.places["dir"]
    if env_ledger == "corrupt":
        ledger = in_sandbox.root / "corrupt.json"
        ledger.write_text("[1, 2")
    monkeypatch.setenv("QWENLITE_LEDGER", str(ledger))
    before = in_sandbox.snapshot()
    for command in ("train", "evaluate"):
        code, err = run_in_process(command, [], capsys)
        assert_refused(code, err, mentions=str(ledger))
    assert in_sandbox.snapshot() == before


# ----- main_guard ---------------------------------------------------------------------------------
def _guarded(exc: BaseException):
    @cli.main_guard
    def main() -> int:
        raise exc

    return main


@pytest.mark.parametrize("exc, fragments", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.h5"),
     ("/data/x.h5", "Permission denied", "permissions")),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/ledger.json"),
     ("runs/ledger.json", "pass a file path")),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a.tmp", None, "b"), ("a.tmp -> b",)),
])
def test_main_guard_turns_os_errors_into_one_line_naming_the_path(exc, fragments, monkeypatch,
                                                                  capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert _guarded(exc)() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_main_guard_reports_a_full_disk(monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    @cli.main_guard
    def main() -> int:
        with open("/dev/full", "w") as f:  # every write fails with ENOSPC
            f.write("x")
        return 0

    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "disk space" in err


def test_main_guard_keeps_the_traceback_of_a_bug_and_of_everything_when_debugging(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(ZeroDivisionError):
        _guarded(ZeroDivisionError("a bug"))()
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(QwenliteError):
        _guarded(QwenliteError("a user error"))()
    with pytest.raises(FileNotFoundError):
        _guarded(FileNotFoundError(errno.ENOENT, "No such file", "x"))()


def test_main_guard_returns_the_status_of_an_argparse_exit(capsys):
    assert _guarded(SystemExit(2))() == 2
    assert _guarded(SystemExit(None))() == 0
    assert _guarded(SystemExit("fatal"))() == 1 and "fatal" in capsys.readouterr().err


# ----- the types accept what they should -----------------------------------------------------------
def test_types_accept_good_values(tmp_path):
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.positive_float("1e-5") == 1e-5 and cli.nonnegative_float("0") == 0.0
    assert cli.probability("1") == 1.0
    assert cli.positive_int(str(cli.INT_MAX)) == cli.INT_MAX
    (tmp_path / "f").write_text("")
    assert cli.existing_file(str(tmp_path / "f")) == str(tmp_path / "f")
    assert cli.existing_dir(str(tmp_path)) == str(tmp_path)
    assert cli.creatable_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert cli.writable_file(str(tmp_path / "new" / "l.json")) == str(tmp_path / "new" / "l.json")
    assert cli.name_list(("a", "b"))(" b, a,b ") == ("b", "a")
    assert cli.repo_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cli.device_name("cpu") == "cpu"
    assert not list(tmp_path.glob("new"))  # checking a path creates nothing


@pytest.mark.parametrize("factory", ["positive_int", "nonnegative_int", "positive_float"])
def test_the_three_original_validators_share_one_factory(factory):
    parse = getattr(cli, factory)
    assert parse.kind == "number" and {"nan", "inf", ""} <= set(parse.bad_values)
    assert any(v.startswith("-") and v != "-inf" for v in parse.bad_values)  # a negative
    for bad in parse.bad_values:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def _parsers():
    import argparse
    import importlib

    from qwenlite.cli import COMMANDS

    for name in COMMANDS:
        parser = importlib.import_module(f"qwenlite.{name}").build_parser()
        todo = [(name, parser)]
        while todo:
            label, p = todo.pop()
            yield label, p
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo += [(f"{label} {k}", sub) for k, sub in action.choices.items()]


def test_every_option_with_a_default_names_it_in_its_help():
    import argparse

    missing = []
    for label, parser in _parsers():
        for action in parser._actions:
            if (not action.option_strings or action.nargs == 0
                    or action.default in (None, False, argparse.SUPPRESS)):
                continue
            text = parser._get_formatter()._format_action(action)
            if "default" not in text:
                missing.append(f"{label} {action.option_strings[0]}")
    assert not missing, missing
    # and the value shown is the default itself
    from qwenlite.train import build_parser

    lr = next(a for a in build_parser()._actions if "--lr" in a.option_strings)
    assert "(default: 1e-05)" in build_parser()._get_formatter()._format_action(lr)
