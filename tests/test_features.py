"""Feature extraction (no sample dropped or doubled under torchrun), weighted kNN
against a brute-force loop and the unchunked computation, the memory bound of the
evaluation path, progress lines, top-k accuracy, label subsets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from conftest import ROOT, child_env, run_script
from features import Progress, feature_batches, knn_predict, topk_accuracy


def test_every_process_gets_every_sample_once_in_order(tmp_path):
    result = run_script(["tests/features_worker.py", tmp_path / "f.pt"], tmp_path, torchrun=3)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.tensor([[float(i), float(i) ** 2] for i in range(10)])
    for rank in range(3):
        got = torch.load(tmp_path / f"f.pt.{rank}")
        assert torch.equal(got["feats"], expected)
        assert got["labels"].tolist() == [i % 4 for i in range(10)]


def brute_force_knn(train, train_y, test, num_classes, k, t):
    preds = []
    for q in test:
        sims = [(float(q @ x) / (q.norm() * x.norm()).item(), int(y)) for x, y in zip(train, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += np.exp(s / t)
        preds.append(votes)
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randn(15, 8, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 4, (60,), generator=g)
    ours = knn_predict(train, train_y, test, 4, k=k, temperature=0.1, test_chunk=4, train_chunk=7)  # several chunks
    ref = brute_force_knn(train, train_y, test, 4, min(k, 60), 0.1)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def full_matrix_knn(train, train_y, test, num_classes, k, t):
    """The unchunked computation: one (n_test, n_train) similarity matrix."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    sims, idx = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), num_classes).scatter_add_(1, train_y[idx], (sims / t).exp())
    return votes, idx


@pytest.mark.parametrize("k,train_chunk,test_chunk", [(10, 7, 4), (30, 64, 5), (200, 13, 200)])
def test_chunked_knn_equals_the_full_matrix(k, train_chunk, test_chunk):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(150, 16, generator=g), torch.randn(23, 16, generator=g)  # continuous: no ties
    train_y = torch.randint(0, 5, (150,), generator=g)
    ref, ref_idx = full_matrix_knn(train, train_y, test, 5, k, 0.1)
    ours = knn_predict(train, train_y, test, 5, k=k, temperature=0.1, test_chunk=test_chunk, train_chunk=train_chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    assert topk_accuracy(ours, train_y[:23], (1,)) == topk_accuracy(ref, train_y[:23], (1,))
    # the same neighbours: bf16 inputs (as amp gives) through the byte-sized default chunks, too
    bf = knn_predict(train.bfloat16(), train_y, test.bfloat16(), 5, k=k, temperature=0.1, chunk_bytes=16 * 4 * 9)
    torch.testing.assert_close(bf, full_matrix_knn(train.bfloat16(), train_y, test.bfloat16(), 5, k, 0.1)[0],
                               rtol=1e-5, atol=1e-5)
    assert len(ref_idx[0]) == min(k, 150)


def test_evaluation_memory_stays_within_one_and_a_half_copies_of_the_features():
    """100,000 x 4,096 bf16 features (0.82 GB, as the issue asks) extracted into host
    memory, kNN of 128 test images against them, one epoch of a linear classifier on
    them, in a fresh process whose peak RSS counts live tensors (bench.py's trick, peak reset after start-up).
    The unchunked kNN alone made a float32 normalised copy (2x the features' bytes) on
    top of them: 5.0x measured. 15-40 s on 2 loaded cores; 128 test rows keep the kNN matmul
    short without changing the bound, which the training-set chunks set."""
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "features_memory_worker.py"),
                          "100000", "4096", "128"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "torch.bfloat16" and res["scores"] == [128, 10]
    assert res["peak_after_extract"] >= 0.95 * res["feature_bytes"]  # the measurement sees the features
    assert res["peak"] <= 1.5 * res["feature_bytes"], res


def test_feature_batches_visit_every_row_once():
    feats, labels = torch.arange(30.0).view(10, 3).bfloat16(), torch.arange(10)
    batches = list(feature_batches(feats, labels, 4, torch.device("cpu"), torch.Generator().manual_seed(1)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))  # shuffled
    for h, y in batches:
        assert torch.equal(h, feats[y])  # rows stay with their labels
    in_order = torch.cat([y for _, y in feature_batches(feats, labels, 4, torch.device("cpu"))])
    assert in_order.tolist() == list(range(10))


def test_progress_line(capsys):
    progress = Progress("train features", 1000, every=0)
    progress.update(250)
    progress.update(2000)  # capped at the total
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train features: 250/1000 images (25%), ")
    assert "img/s, elapsed 0:00:0" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("train features: 1000/1000 images (100%)") and lines[1].endswith("ETA 0:00:00")
    quiet = Progress("x", 10, every=3600)
    quiet.update(5)
    assert capsys.readouterr().out == ""


def test_knn_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    train_y, test_y = torch.arange(90) % 3, torch.arange(30) % 3
    train = centres[train_y] + torch.randn(90, 16, generator=g)
    test = centres[test_y] + torch.randn(30, 16, generator=g)
    assert topk_accuracy(knn_predict(train, train_y, test, 3, k=10), test_y, (1,))[0] == 100.0


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 0]), (1, 2)) == pytest.approx([100 / 3, 200 / 3])


def test_balanced_subset():
    labels = np.repeat(np.arange(5), [100, 100, 100, 100, 7])
    chosen = data.balanced_subset(labels, 0.1, seed=0)
    counts = np.bincount(labels[chosen])
    assert counts.tolist() == [10, 10, 10, 10, 1]  # at least one of every class
    assert len(set(chosen.tolist())) == len(chosen) and (np.diff(chosen) > 0).all()
    assert not np.array_equal(chosen, data.balanced_subset(labels, 0.1, seed=1))
    assert np.array_equal(chosen, data.balanced_subset(labels, 0.1, seed=0))


def test_subset_file(tmp_path):
    class Folder:  # the ImageFolder interface: samples of (path, class)
        samples = [(f"/d/train/c{i % 2}/img_{i}.JPEG", i % 2) for i in range(6)]

        def __len__(self):
            return 6

    (tmp_path / "ok.txt").write_text("img_4.JPEG\n\nimg_1.JPEG\nc0/img_2.JPEG\n")
    assert data.subset_from_file(Folder(), str(tmp_path / "ok.txt")).tolist() == [1, 2, 4]
    (tmp_path / "bad.txt").write_text("img_1.JPEG\nimg_99.JPEG\n")
    with pytest.raises(data.DataError, match=r"1 of 2 names .*\(first: img_99.JPEG\)"):
        data.subset_from_file(Folder(), str(tmp_path / "bad.txt"))
    synthetic = data.build_dataset("synthetic", "", "train", synthetic_size=20)
    (tmp_path / "idx.txt").write_text("3\n0\n3\n")
    assert data.subset_from_file(synthetic, str(tmp_path / "idx.txt")).tolist() == [0, 3]
    with pytest.raises(data.DataError, match="does not exist"):
        data.subset_from_file(synthetic, str(tmp_path / "none.txt"))
