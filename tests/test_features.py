"""Feature extraction (no sample dropped or doubled under torchrun), weighted kNN
against a brute-force loop, top-k accuracy, label subsets."""
import numpy as np
import pytest
import torch

import data
from conftest import run_script
from features import knn_predict, topk_accuracy


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
    ours = knn_predict(train, train_y, test, 4, k=k, temperature=0.1, chunk=4)  # several chunks
    ref = brute_force_knn(train, train_y, test, 4, min(k, 60), 0.1)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


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
