"""Peak host memory of the evaluation path at a size that shows the bound: extract
N x D bf16 features, kNN of T test rows against them, one epoch of a linear
classifier on them. Run in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (see
bench.py) so that peak RSS counts live tensors; prints one JSON line.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/features_memory_worker.py N D T
"""
import json
import os
import sys
import time

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from features import extract_features, feature_batches, knn_predict  # noqa: E402


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, i % 10


def as_tensor(i, generator):
    return torch.tensor(float(i))


class Features(torch.nn.Module):
    """Image index i -> a fixed pseudo-random bf16 feature row sin(i * w + b), as amp gives."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w, self.b = torch.rand(d, generator=g) * 3, torch.rand(d, generator=g) * 6

    def forward(self, x):  # (b,) -> (b, d)
        return torch.sin(x[:, None] * self.w + self.b).bfloat16()


def status_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    """Start the peak (VmHWM) afresh from the current RSS (Linux 4.0+): a peak reached before,
    e.g. while importing, would otherwise hide up to its excess over the baseline."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss():
    return status_bytes("VmHWM")


def main():
    n, d, t = (int(a) for a in sys.argv[1:4])
    cpu = torch.device("cpu")
    model = Features(d)
    loader = data.make_loader(data.SeededTransform(Indices(n), as_tensor), batch_size=2048, train=False, workers=0)
    test_loader = data.make_loader(data.SeededTransform(Indices(t), as_tensor), batch_size=2048, train=False,
                                   workers=0)
    model(torch.arange(2048.0))  # warm-up at batch size
    reset_peak()
    base = status_bytes("VmRSS")
    start = time.time()
    train_f, train_y = extract_features(model, loader, cpu, store="host", progress_every=1e9)
    test_f, test_y = extract_features(model, test_loader, cpu, store="host", progress_every=1e9)
    after_extract = peak_rss() - base
    scores = knn_predict(train_f, train_y, test_f, 10, k=200, device=cpu)
    after_knn = peak_rss() - base
    classifier = torch.nn.Linear(d, 10)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    for h, y in feature_batches(train_f, train_y, 4096, cpu, torch.Generator().manual_seed(0)):
        loss = torch.nn.functional.cross_entropy(classifier(h.float()), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(json.dumps({"feature_bytes": train_f.numel() * train_f.element_size() + test_f.numel() * test_f.element_size(),
                      "dtype": str(train_f.dtype), "peak_after_extract": after_extract, "peak_after_knn": after_knn,
                      "peak": peak_rss() - base, "seconds": round(time.time() - start, 1),
                      "scores": list(scores.shape), "loss": loss.item()}))


if __name__ == "__main__":
    main()
