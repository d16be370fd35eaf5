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


def test_profile_step_labels_every_part_and_compares_the_blur_forms(tmp_path):
    result = run_script(["tools/profile_step.py", "--device", "cpu", "--image-size", "48", "--batch-size", "8",
                         "--steps", "1", "--workers", "1", "--top", "5", "--blur-forms",
                         "--trace", tmp_path / "trace.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = result.stdout.split("[parts]")[1].split("[operators]")[0]
    for name in ("loader wait", "copy + distortion", "jitter: hue", "grayscale", "blur", "forward", "loss",
                 "backward", "lars"):
        assert f"  {name} " in parts, parts
    assert "aten::" in result.stdout.split("[operators]")[1]
    gap = float(result.stdout.split("largest difference between the two: ")[1].split()[0])
    assert gap < 1e-6  # the two forms compute the same blur
    assert (tmp_path / "trace.json").stat().st_size > 1000
