"""bench.py runs every section on CPU at tiny sizes and reports its ratios."""
import json

from conftest import ROOT, run_script


def test_bench_runs_on_cpu(tmp_path):
    result = run_script(["bench.py", "--device", "cpu", "--view-images", "2", "--rounds", "1", "--image-size", "32",
                         "--batch-size", "8", "--steps", "2", "--workers", "1", "--loss-sizes", "64,256",
                         "--epoch-images", "64", "--memory-cases", "2x32", "--memory-width", "0.25",
                         "--memory-rounds", "1", "--json", tmp_path / "bench.json",
                         "--views-baseline", ROOT + "/augment.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch CPU capability " in result.stdout.splitlines()[0]  # the machine behind the numbers
    for text in ("ours / torchvision:", "crop + flip only / torchvision:", "ours / baseline (",
                 "(a) data on device (ceiling)", "(c) / (b):", "2N =    256 broadcast",
                 "[epoch] ResNet-18 CIFAR stem, 64 generated", "-> checkpointing:"):
        assert text in result.stdout, result.stdout
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["views"]["ratio_ours_over_torchvision"] > 0 and results["views"]["ratio_ours_over_baseline"] > 0
    assert {r["form"] for r in results["loss"]["loss"]} == {"ours", "broadcast"}
    assert all(r["peak_bytes"] >= 0 for r in results["loss"]["loss"])
