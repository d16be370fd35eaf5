"""extract_features under torchrun (gloo): every process must get every sample
exactly once, in dataset order, although DistributedSampler pads the shards.

    torchrun --standalone --nproc_per_node=3 tests/features_worker.py OUT.pt
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from features import extract_features  # noqa: E402
from distributed import teardown  # noqa: E402

N = 10  # not a multiple of 3 processes x batch 2: the sampler pads with repeats


class Numbers(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return i, i % 4  # "image" i, label i % 4


def identity_transform(x, generator):
    return torch.tensor([float(x), float(x) ** 2])


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = data.make_loader(data.SeededTransform(Numbers(), identity_transform), batch_size=2, train=False,
                              workers=0, rank=rank, world=world)
    feats, labels = extract_features(torch.nn.Identity(), loader, torch.device("cpu"))
    torch.save({"feats": feats, "labels": labels}, f"{sys.argv[1]}.{rank}")
    teardown(0)  # as the scripts end: gloo's destructor can abort or hang at interpreter exit


if __name__ == "__main__":
    main()
