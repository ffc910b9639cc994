"""The benchmark's bookkeeping (bench/): which cells the suite still has to run, how seeds fold into one result, and
the ratios its tables claim. The cells themselves take minutes each and run in bench/, not here."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))   # bench/ is not a package
import harness  # noqa: E402
from records import Output, results_of  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402
from tables import ratio_lines, seed_lines  # noqa: E402

PAPER = SCENARIOS["paper"]
A, B, AB = "classes_0_4", "classes_5_9", "classes_0_4,classes_5_9"


def write(output: Output, method: str, seed: int, macs: tuple, test: tuple, models: str = "m1") -> None:
    path = output.record(PAPER, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "method": method, "commit": "abc", "models": models, "seconds": 10.0 + seed, "peak_rss_mb": 100.0,
        "original_test": {A: 0.9, B: 0.9}, "macs": dict(zip((A, B, AB), macs)), "test": dict(zip((A, B), test))}))


def test_list_names_exactly_the_cells_without_a_record(tmp_path, capsys):
    output = Output.under(tmp_path)
    harness.main(["--list", "--quick", "--out", str(tmp_path)])
    assert capsys.readouterr().out.split("\n")[:-1] == [f"paper / {m} / seed 0" for m in harness.METHODS]
    write(output, "mtz+taylor", 0, (1, 1, 1), (0.9, 0.9))
    harness.main(["--list", "--quick", "--out", str(tmp_path)])
    listed = capsys.readouterr().out
    assert "mtz+taylor" not in listed and "pam+taylor / seed 0" in listed
    harness.main(["--list", "--scenario", "paper", "--method", "pam+taylor", "--seeds", "3", "--out", str(tmp_path)])
    assert capsys.readouterr().out.split("\n")[:-1] == [f"paper / pam+taylor / seed {s}" for s in range(3)]


@pytest.mark.parametrize("argv", [["--method", "pam+magic"], ["--method", "zip+taylor"], ["--method", "mtz+taylor zip"],
                                  ["--method", "alone+taylor own"], ["--jobs", "0"]])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit):
        harness.main(["--list", *argv])
    assert argv[1] in capsys.readouterr().err


def test_seeds_fold_into_medians_and_the_worst_accuracy(tmp_path):
    output = Output.under(tmp_path)
    write(output, "pam+taylor", 0, (100, 300, 500), (0.88, 0.90))
    write(output, "pam+taylor", 1, (200, 100, 300), (0.89, 0.85))
    write(output, "pam+taylor", 2, (300, 200, 400), (0.87, 0.91))
    write(output, "pam+taylor", 3, (1, 1, 1), (0.1, 0.1), models="other")     # other models: left out
    folded = results_of(output, PAPER)["pam+taylor"]
    assert folded["macs"] == {A: 200, B: 200, AB: 400}
    assert folded["test"] == {A: 0.87, B: 0.85}
    assert folded["all_task_macs"] == [500, 300, 400] and folded["seeds"] == 3
    assert folded["seconds"] == 11.0 and folded["seed0_macs"][AB] == 500


def test_ratios_count_the_combinations_where_pam_costs_more(tmp_path):
    output = Output.under(tmp_path)
    write(output, "none+taylor", 0, (400, 100, 500), (0.9, 0.9))
    write(output, "mtz+taylor", 0, (300, 300, 300), (0.9, 0.9))
    write(output, "pam+taylor", 0, (200, 200, 250), (0.9, 0.9))
    results = results_of(output, PAPER)
    columns = [(c, [c.split(",")]) for c in (A, B, AB)] + [("all", [[A], [B], [A, B]])]
    lines = {line.split(" |")[0]: line for line in ratio_lines(results, (A, B), columns, "pam+taylor")}
    assert lines["| none+taylor / pam"] == \
        "| none+taylor / pam | 2.00x | 0.50x | 2.00x | 2.00x (0.50 - 2.00) | 1 of 3 (e.g. {classes_5_9}) |"
    assert lines["| mtz+taylor / pam"] == "| mtz+taylor / pam | 1.50x | 1.50x | 1.20x | 1.50x (1.20 - 1.50) | 0 of 3 |"
    # perfect sharing: none's combination against its dearest task alone, 500 / 400
    assert lines["| perfect-sharing limit"] == \
        "| perfect-sharing limit | 1.00x | 1.00x | 1.25x | 1.00x (1.00 - 1.25) | |"


def test_seed_lines_count_pairs_of_seeds_and_test_them(tmp_path):
    pytest.importorskip("scipy", reason="the bench extra (bash setup.sh --bench) gives the seeds' statistics")
    output = Output.under(tmp_path)
    for seed, macs in enumerate((100, 110, 120)):
        write(output, "pam+taylor", seed, (macs, macs, macs), (0.9, 0.9))
    for seed, macs in enumerate((115, 200, 300)):
        write(output, "mtz+taylor", seed, (macs, macs, macs), (0.9, 0.9))
    lines = seed_lines(results_of(output, PAPER), ["mtz+taylor"], "pam+taylor")
    # pam is cheaper in 8 of the 9 pairs (120 > 115 is the ninth); three seeds each cannot reach p <= 0.05
    assert lines[0].startswith("- All tasks, pam+taylor against mtz+taylor over seeds (3 and 3): pam is cheaper "
                               "in 8 of 9 pairs of seeds; Mann-Whitney U two-sided p = 0.20")
    assert "cannot tell" in lines[0]


@pytest.mark.parametrize("name", ["resnet18_64", "mobilenet_64"])
def test_the_user_size_architectures_merge_exactly_and_their_generated_code_agrees(name, tmp_path):
    """The 3x64x64 scenarios' networks (ResNet-18-like, MobileNetV3-small-like with squeeze-excitation), two tasks
    with other heads and weights: merge="none" reproduces each original and counts its MACs as torch's counter does;
    a random grouping of their units (shared and private groups) generates a module equal to the network."""
    import pamfx
    from conftest import assert_equivalent, build_random, counted_macs, load_generated, randomised
    from pamfx.ir import all_combinations
    from scenarios import make_model
    scenario = SCENARIOS[name]
    x = scenario.inputs(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 64, 64) and x.stride(1) == 0    # three views of one upsampled channel
    torch.manual_seed(0)
    models = {"a": randomised(make_model(scenario, 2), 1), "b": randomised(make_model(scenario, 5), 2)}
    data = {"a": (x, torch.tensor([0, 1, 0, 1])), "b": (x, torch.tensor([0, 1, 2, 4]))}
    result = pamfx.optimize(models, data, eval_data=data, merge="none", prune=None, progress=False)
    with torch.no_grad():
        merged = result.model(x)
        for task, model in models.items():
            torch.testing.assert_close(merged[task], model(x), rtol=1e-5, atol=1e-5)
            assert result.model.macs([task]) == counted_macs(lambda m=model: m(x[:1]))
    network = build_random(models, 3, example=x[:2])
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), f"gen_{name}").load()
    assert_equivalent(lambda inputs: network(inputs), generated, x, all_combinations(("a", "b")))
