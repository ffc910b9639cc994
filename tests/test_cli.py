"""The command line `pamfx demo`, run on a tiny fake Fashion-MNIST: it reports every combination, writes a module
that equals the network, refuses to overwrite unasked, and turns a missing prerequisite into exit code 2."""
import re
import subprocess
import sys

import pytest

import pamfx
from pamfx.demo.cli import main

TASKS = ("classes_0_4", "classes_5_9")
COMBINATIONS = {"{classes_0_4}", "{classes_5_9}", "{classes_0_4, classes_5_9}"}


def table_combinations(stdout: str) -> set[str]:
    """The first cell of every row of the markdown report."""
    return {match.group(1) for match in re.finditer(r"^\| (\{[^}]*\}) \|", stdout, re.MULTILINE)}


def test_demo_reports_every_combination_and_writes_a_matching_module(demo_args, tmp_path, capsys):
    assert main(demo_args) == 0
    out = capsys.readouterr().out
    assert table_combinations(out) == COMBINATIONS
    for task in TASKS:
        assert f"{task}: LeNet-5 test accuracy" in out and f"acc {task} (orig" in out
    assert re.search(r"^check: .* matches .* for all 3 combinations", out, re.MULTILINE)
    assert "[pamfx]" not in out   # --quiet silences optimize's progress
    assert (tmp_path / "out" / "merged.py").is_file() and (tmp_path / "out" / "merged.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"lenet5-{t}-seed0-ep1.pt" for t in TASKS]


def test_second_run_refuses_to_overwrite_unless_asked(demo_args, tmp_path, capsys):
    assert main(demo_args) == 0
    generated = tmp_path / "out" / "merged.py"
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    capsys.readouterr()

    assert main(demo_args) == 2
    captured = capsys.readouterr()
    assert str(generated) in captured.err and "--overwrite" in captured.err
    assert captured.out == ""   # refused before any work

    assert main(demo_args + ["--overwrite"]) == 0
    assert table_combinations(capsys.readouterr().out) == COMBINATIONS
    assert {p: p.stat().st_mtime_ns for p in cached} == cached   # models came from the cache, not retrained


def test_missing_dataset_exits_2_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PAMFX_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert main(["demo", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "merged.py")]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and str(tmp_path / "nowhere") in err
    assert not (tmp_path / "merged.py").exists()


@pytest.mark.parametrize("option", [["--out", "merged.txt"], ["--epochs", "0"], ["--merge", "bogus"], ["--zip", "2"],
                                    ["--zip", "half"], ["--zip-choice", "cheapest"],
                                    ["--tolerance", "-0.1"], ["--tolerance", "nan"]])
def test_bad_option_is_a_usage_error(demo_args, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(demo_args + option)
    assert exit_info.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_python_m_pamfx_exits_2_without_traceback(tmp_path):
    """The module entry point passes main()'s exit code to the shell."""
    env = {"PAMFX_FASHION_MNIST": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "pamfx", "demo", "--out", str(tmp_path / "merged.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert "dataset-fashion-mnist" in run.stderr and "Traceback" not in run.stderr


def test_own_and_zip_reach_optimize(demo_args, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(pamfx, "optimize", spy)
    for extra, wanted in (([], False), (["--own"], True)):
        with pytest.raises(Stop):
            main(demo_args + extra)
        assert seen["pruning"].alone is wanted
    for extra, degree, choice in (([], 0.0, "guard"), (["--zip", "0.9", "--zip-choice", "pruned"], 0.9, "pruned")):
        with pytest.raises(Stop):
            main(demo_args + extra)
        assert (seen["pam"].zip_degree, seen["pam"].zip_choice) == (degree, choice)
