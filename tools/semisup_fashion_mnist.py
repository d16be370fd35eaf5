"""SimCLRv2's semi-supervised pipeline on Fashion-MNIST, whole, at a size a 2-core CPU runs in about an hour:
pretrain -> fine-tune on 10% and 1% of the labels with each recipe -> distil without labels, beside
the same networks trained from random weights on the same labels.

  taskset -c 1 env OMP_NUM_THREADS=1 python tools/semisup_fashion_mnist.py --data-dir data

1. A class-balanced split of Fashion-MNIST (--train-size / --test-size images, --split-seed), written
   once as PNG files in the ImageNet layout, WORK/split/{train,val}/CLASS/*.png (compare_lightly.py's
   write_split): its training images are "the training split" every step uses, the labels of 10%
   and 1% of them (per class, finetune.py's choice with --seed) the only labels any step sees.
2. pretrain.py on every training image, no labels (scored, for reference only, by linear_eval.py
   --cached-features with every training label: kNN and a linear classifier on frozen features): ResNet-18 (CIFAR stem) at --width, 28 px, a
   three-layer (v2) projection head, the official CIFAR recipe plus the three flags that helped at
   this budget (README, Results: --lr 0.3 --lr-scaling sqrt --weight-decay 1e-6 --temperature 0.2
   --no-zero-init-residual), one warmup epoch.
3. finetune.py on 10% and 1% of the labels, --recipe v2 and --recipe v1, each beside --random-init
   (the same network and recipe from random weights: the supervised baseline).
4. distill.py from the v2-recipe fine-tuned network of each fraction (chosen before any result: the
   recipe finetune.py picks for this checkpoint), on every training image without its label: a
   student of the teacher's architecture (self-distillation) from random weights and from the
   pretrained encoder, and one of --small-width from random weights; beside that smaller network
   trained from random weights on the labels alone (finetune.py --random-init, both recipes).
5. Both networks trained from random weights on the labels alone with a from-scratch recipe (SUPERVISED:
   SGD, CIFAR's lr and weight decay, 100 / 200 epochs), the fine-tuning recipes' lr being far too low
   for random weights; and, as a control, the pretrained network fine-tuned with that same recipe.

Every command, its wall time and its test top-1 go to WORK/results.json and the table printed at the
end; runs that finished are reused (their results file is there), so the command can be repeated.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import data  # noqa: E402
from compare_lightly import write_split  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="holds FashionMNIST/raw; see data.py")
    p.add_argument("--work", default="runs/semisup_fmnist", help="split, runs, logs and results go here")
    p.add_argument("--train-size", type=int, default=6000, help="training images (unlabeled pool), per class equal")
    p.add_argument("--test-size", type=int, default=2000, help="test images, per class equal")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="every run's --seed (label subsets, init, order)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 width of the pretrained network")
    p.add_argument("--small-width", type=float, default=0.125, help="ResNet-18 width of the smaller student")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=0, help="data loading processes of every run")
    args = p.parse_args(argv)
    args.dataset = "fashionmnist"
    return args


FRACTIONS = (("10pct", 0.1, 64, 100), ("1pct", 0.01, 16, 200))  # name, label fraction, batch, supervised epochs
# Training from random weights on the labels alone, with a from-scratch recipe rather than a fine-tuning
# one: SGD with Nesterov momentum, CIFAR's lr (0.1 at batch 128, i.e. 0.2 x batch/256) and weight decay
# 5e-4, cosine, about 600-900 steps (not tuned here)
SUPERVISED = ["--recipe", "v1", "--lr", 0.2, "--weight-decay", 5e-4]


def run(name, argv, args, results, result_file):
    """Run one script (python SCRIPT ...) unless its results file exists; log, time and record it."""
    os.makedirs(os.path.join(args.work, "logs"), exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, argv[0]), *map(str, argv[1:])]
    shown = "python " + " ".join(shlex.quote(str(a)) for a in argv)
    if name in results and os.path.exists(result_file):
        print(f"{name}: done before ({results[name]['seconds']:.0f} s)", flush=True)
        return results[name]
    print(f"{name}: {shown}", flush=True)
    start = time.time()
    with open(os.path.join(args.work, "logs", f"{name}.log"), "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if status != 0:
        sys.exit(f"{name} failed (exit {status}); see {os.path.join(args.work, 'logs', name + '.log')}")
    with open(result_file) as f:
        got = json.load(f) if result_file.endswith(".json") else {}
    results[name] = {"command": shown, "seconds": round(time.time() - start, 1), "result": result_file,
                     **{k: got.get(k) for k in ("top1", "teacher_top1", "test_agreement", "knn_top1")}}
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{name}: {results[name]['seconds']:.0f} s, top-1 {results[name]['top1']}", flush=True)
    return results[name]


def main():
    args = get_args()
    split = write_split(args)  # WORK/split/{train,val}/CLASS/*.png
    work = os.path.abspath(args.work)
    path = os.path.join(work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    common = ["--workers", args.workers, "--seed", args.seed]
    pre = os.path.join(work, "pretrain")
    run("pretrain", ["pretrain.py", "--dataset", "imagefolder", "--data-dir", split, "--image-size", 28,
                     "--arch", "resnet18", "--width", args.width, "--proj-layers", 3, "--batch-size", 128,
                     "--epochs", args.pretrain_epochs, "--warmup-epochs", 1, "--lr", 0.3, "--lr-scaling", "sqrt",
                     "--weight-decay", 1e-6, "--temperature", 0.2, "--no-zero-init-residual", "--knn-every", 0,
                     "--log-every", 10, "--out", pre, "--auto-resume", *common], args, results,
        os.path.join(pre, "encoder.pt"))
    encoder = os.path.join(pre, "encoder.pt")
    out = os.path.join(work, "linear_pretrained.json")  # the pretrained features, scored with every label (a reference)
    run("linear_pretrained", ["linear_eval.py", encoder, "--cached-features", "--batch-size", 256, "--progress-every",
                              300, *common, "--out", out], args, results, out)
    small = os.path.join(work, f"small_w{args.small_width:g}.pt")  # a random small encoder, for its baseline
    if not os.path.exists(small):
        from model import build_encoder, save_encoder
        save_encoder(small, build_encoder("resnet18", args.small_width, cifar_stem=True), dataset="imagefolder",
                     data_dir=split, image_size=28)
    for tag, fraction, batch, supervised_epochs in FRACTIONS:
        ft = ["--label-fraction", fraction, "--batch-size", batch, "--progress-every", 300, *common]
        for recipe in ("v2", "v1"):
            for init in ("pretrained", "random"):
                name = f"finetune_{tag}_{recipe}" + ("_random_init" if init == "random" else "")
                out = os.path.join(work, f"{name}.json")
                run(name, ["finetune.py", encoder, "--recipe", recipe, *ft, "--out", out, "--auto-resume",
                           *(["--random-init"] if init == "random" else [])], args, results, out)
        for recipe in ("v2", "v1"):  # the smaller network on the labels alone
            name = f"finetune_{tag}_{recipe}_small_random_init"
            out = os.path.join(work, f"{name}.json")
            run(name, ["finetune.py", small, "--recipe", recipe, *ft, "--random-init", "--out", out, "--auto-resume"],
                args, results, out)
        # the from-scratch recipe: both networks from random weights, and (a control) the pretrained one
        for name, checkpoint, init in ((f"supervised_{tag}", encoder, ["--random-init"]),
                                       (f"supervised_{tag}_small", small, ["--random-init"]),
                                       (f"supervised_recipe_{tag}_pretrained", encoder, [])):
            out = os.path.join(work, f"{name}.json")
            run(name, ["finetune.py", checkpoint, *SUPERVISED, *ft, "--epochs", supervised_epochs, *init,
                       "--out", out, "--auto-resume"], args, results, out)
        teacher = os.path.join(work, f"finetune_{tag}_v2.pt")
        for student, flags in (("self", []), ("self_init", ["--init", encoder]), ("small", ["--width", args.small_width])):
            out = os.path.join(work, f"distill_{tag}_{student}")
            run(f"distill_{tag}_{student}", ["distill.py", teacher, *flags, "--batch-size", 128, "--epochs",
                                             args.distill_epochs, "--progress-every", 300, "--out", out,
                                             "--auto-resume", *common], args, results,
                os.path.join(out, "results.json"))
    print_table(results)


def print_table(results):
    rows = [(k, v) for k, v in results.items() if v.get("top1") is not None]
    print("\n| run | test top-1 | teacher top-1 | agreement | seconds |\n|---|---|---|---|---|")
    for name, r in rows:
        teacher = f"{r['teacher_top1']:.2f}%" if r.get("teacher_top1") is not None else ""
        agreement = f"{r['test_agreement']:.2f}%" if r.get("test_agreement") is not None else ""
        print(f"| {name} | {r['top1']:.2f}% | {teacher} | {agreement} | {r['seconds']:.0f} |")
    total = sum(r["seconds"] for r in results.values())
    print(f"\ntotal {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        sys.exit(f"semisup_fashion_mnist.py: error: {e}")
