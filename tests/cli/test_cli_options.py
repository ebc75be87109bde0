"""The command line never prints a traceback for user error (issue 19, item 13 and deliverable 5).

Walks every subcommand of ``graphwright.cli.main.build_parser()`` and gives every numeric option
0, -1, a huge value, a non-number and no value, every path option a directory, a file and a path under a
file. Invariant: each run either exits non-zero with exactly one line on stderr naming the problem
(and no traceback), or gets as far as loading the model, which the test stubs out (the value was
accepted; nothing heavy runs). Huge values and non-numbers are always refused at parse time.
The handler itself is tested with OSError / RuntimeError / RecursionError raised from a command.
"""

from __future__ import annotations

import argparse

import pytest

import graphwright
from graphwright.cli import main as cli_main
from graphwright.cli.main import build_parser, main


class Reached(BaseException):
    """Raised by the stubbed model loader: the arguments got past every check made before loading."""


@pytest.fixture
def no_load(monkeypatch):
    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(graphwright, "load_model", stop)


def leaves(parser, prefix=()):
    """(command words, parser) for every runnable (sub)command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for a in subs:
        for name, sub in a.choices.items():
            yield from leaves(sub, (*prefix, name))


LEAVES = list(leaves(build_parser()))


def kind(action) -> str | None:
    t = action.type
    name = getattr(t, "__name__", None) if t is not None else None
    return name if name in ("int", "float", "out_file", "out_dir", "in_file") else None


def base_argv(words, parser) -> list[str]:
    argv = list(words)
    for a in parser._actions:
        if not a.option_strings and a.dest not in ("help", "command", "steer_command") and a.required:
            argv.append("hello")  # e.g. generate's prompt
    if any("--model" in a.option_strings for a in parser._actions):
        argv += ["--model", "tiny-llama"]
    return argv


OPTIONS = [(words, parser, a) for words, parser in LEAVES for a in parser._actions if kind(a)]
NUMERIC = [(w, p, a) for w, p, a in OPTIONS if kind(a) in ("int", "float")]


def test_the_walk_covers_every_command_and_the_named_options():
    assert {w[0] for w, _ in LEAVES} == set(cli_main.COMMANDS)
    names = {(" ".join(w), a.option_strings[0]) for w, _, a in OPTIONS}
    for want in [("bench", "--prompt"), ("bench", "--batch"), ("export", "--opset"), ("eval", "--tokens"),
                 ("steer eval", "--examples"), ("compile", "--json"), ("inspect", "--out"), ("generate", "--seed")]:
        assert want in names
    assert len(NUMERIC) >= 35


def run_cli(argv, capsys) -> tuple[str, int | None, str]:
    """('refused', code, stderr) or ('reached', None, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except Reached:
        return "reached", None, capsys.readouterr().err
    err = capsys.readouterr().err
    return ("refused" if code else "ok"), code, err


def assert_clean(argv, status, code, err):
    assert "Traceback" not in err, (argv, err)
    if status == "refused":
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and "error:" in lines[0], (argv, err)


def check_option(words, parser, action, value, capsys):
    opt = action.option_strings[0]
    argv = [*base_argv(words, parser), opt, value]
    status, code, err = run_cli(argv, capsys)
    assert_clean(argv, status, code, err)
    return status, code, err, opt


FAST_VALUES = ["0", "-1", str(10**30), "abc"]


@pytest.mark.parametrize("words,parser,action", NUMERIC, ids=[f"{' '.join(w)} {a.option_strings[0]}" for w, _, a in NUMERIC])
def test_numeric_options_never_give_a_traceback(words, parser, action, capsys, no_load):
    for value in FAST_VALUES:
        status, code, err, opt = check_option(words, parser, action, value, capsys)
        if value in (str(10**30), "abc"):  # always refused, at parse time, naming the option
            assert status == "refused" and code == 2 and f"argument {opt}" in err, (opt, value, err)
    argv = [*base_argv(words, parser), action.option_strings[0]]  # the value missing
    status, code, err = run_cli(argv, capsys)
    assert_clean(argv, status, code, err)
    assert status == "refused" and code == 2 and "expected" in err


SLOW_VALUES = ["nan", "inf", "-inf", "1e308", "-0", "1.5", "", " 7", "0x10", "1_000", "9" * 5000, "٣", "1e-320", str(2**64), str(2**63)]


@pytest.mark.slow
@pytest.mark.parametrize("words,parser,action", NUMERIC, ids=[f"{' '.join(w)} {a.option_strings[0]}" for w, _, a in NUMERIC])
def test_numeric_options_long(words, parser, action, capsys, no_load):
    for value in SLOW_VALUES:
        check_option(words, parser, action, value, capsys)


PATHS = [(w, p, a) for w, p, a in OPTIONS if kind(a) in ("out_file", "out_dir", "in_file")]


@pytest.mark.parametrize("words,parser,action", PATHS, ids=[f"{' '.join(w)} {a.option_strings[0]}" for w, _, a in PATHS])
def test_path_options_refuse_the_wrong_kind_of_path(words, parser, action, tmp_path, capsys, no_load):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad = {"out_file": [str(tmp_path), str(a_file / "x.json"), ""],
           "out_dir": [str(a_file), str(a_file / "sub"), ""],
           "in_file": [str(tmp_path), str(tmp_path / "missing.txt"), "/dev/null"]}[kind(action)]
    for value in bad:
        status, code, err, opt = check_option(words, parser, action, value, capsys)
        assert status == "refused" and code == 2 and f"argument {opt}" in err, (value, err)


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--prompt", "0"], "argument --prompt: must be an integer in [1, 1000000]; got 0"),
    (["bench", "--batch", "0"], "argument --batch: must be an integer in [1, 4096]; got 0"),
    (["steer", "eval", "--examples", "0"], "argument --examples: must be an integer in [1, 1000000]; got 0"),
    (["export", "--opset", "99999"], "argument --opset: must be an integer in [23, 10000]; got 99999"),
    (["eval", "--tokens", "-5"], "argument --tokens: must be an integer in [2, 1000000000]; got -5"),
    (["generate", "hi", "--temperature", "nan"], "argument --temperature: must be a number in (0, 1e+06]; got nan"),
    (["generate", "hi", "--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]; got 1.5"),
])
def test_named_cases_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_json_to_a_directory_and_inspect_out_to_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    for argv, needle in [(["compile", "--json", str(tmp_path)], "is a directory; give a file path"),
                         (["inspect", "--out", str(f)], "is a file; give a folder path")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err


def test_opset_above_what_onnx_knows_is_refused_before_loading(capsys, no_load):
    import onnx

    top = onnx.defs.onnx_opset_version()
    assert main(["export", "--model", "tiny-llama", "--opset", str(top + 1)]) == 2
    assert f"give 23..{top}" in capsys.readouterr().err


def test_ppl_prefix_must_be_below_the_window(capsys, no_load):
    assert main(["eval", "--suite", "long", "--ppl-window", "64", "--ppl-prefix", "64"]) == 2
    assert "--ppl-prefix 64 must be below --ppl-window 64" in capsys.readouterr().err


@pytest.mark.parametrize("exc,code,needle", [
    (IsADirectoryError(21, "Is a directory", "/tmp/x"), 2, "error: Is a directory: /tmp/x"),
    (PermissionError(13, "Permission denied"), 2, "error: Permission denied"),
    (RuntimeError("value cannot be converted to type int without overflow"), 1, "error: RuntimeError: value cannot be converted"),
    (RecursionError("maximum recursion depth exceeded"), 1, "error: RecursionError: maximum recursion depth exceeded"),
    (MemoryError(), 1, "error: MemoryError: MemoryError"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_handler_prints_one_line_for_each_error_kind(monkeypatch, capsys, exc, code, needle):
    import graphwright.cli.cmd_compile as cmd

    def boom(args):
        raise exc

    monkeypatch.setattr(cmd, "run", boom)
    monkeypatch.delenv("GRAPHWRIGHT_TRACEBACK", raising=False)
    assert main(["compile"]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and needle in err and "Traceback" not in err


def test_traceback_on_request(monkeypatch):
    import graphwright.cli.cmd_compile as cmd

    def boom(args):
        raise RuntimeError("internal")

    monkeypatch.setattr(cmd, "run", boom)
    monkeypatch.setenv("GRAPHWRIGHT_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="internal"):
        main(["compile"])


def test_failed_export_leaves_no_half_written_folder(monkeypatch, tmp_path, capsys):
    import graphwright.cli.cmd_export as cmd

    out = tmp_path / "art"

    def half_write(cm, path, **kw):
        out.mkdir()
        (out / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("exporter failed half-way")

    monkeypatch.setattr(cmd, "load", lambda args: (None, None))
    monkeypatch.setattr(cmd, "compile_model", lambda *a: None)
    monkeypatch.setattr(graphwright, "export_onnx", half_write)
    assert main(["export", "--out", str(out)]) == 1
    assert not out.exists()
    assert "exporter failed half-way" in capsys.readouterr().err
    # a folder the user already had is left alone
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    out = keep
    monkeypatch.setattr(graphwright, "export_onnx", lambda cm, path, **kw: (_ for _ in ()).throw(RuntimeError("x")))
    assert main(["export", "--out", str(keep), "--overwrite"]) == 1
    assert (keep / "notes.txt").read_text() == "mine"
