"""Features of a frozen network over a whole dataset, weighted kNN, top-k accuracy.

Used by linear_eval.py, finetune.py and pretrain.py's kNN monitor. Under
torch.distributed each process runs its share of the dataset and every
process gets all rows back in dataset order: no sample is dropped or counted
twice (DistributedSampler's padding is removed).

The kNN classifier is the weighted vote of Wu et al. 2018 used to monitor
SimCLR-style training: cosine similarity, k = 200 neighbours, each voting
exp(sim / 0.1) for its class.

    feats, labels = extract_features(encoder.eval(), loader, device)
    top1 = knn_accuracy(train_feats, train_labels, feats, labels, num_classes)
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, loader, device, amp=False, channels_last=False):
    """model(x) for every sample of loader.dataset -> (features (N, d), labels (N,)) on `device`.

    The loader must iterate a DistributedSampler without shuffling (possibly
    wrapped, as data.make_loader does). Features keep the dtype the model
    gives (bf16 under amp). Put the model in eval mode first.
    """
    sampler = getattr(loader.sampler, "sampler", loader.sampler)
    indices = torch.tensor(list(iter(sampler)), device=device)  # this rank's samples, in loader order
    feats, labels = [], []
    for batch in loader:  # (images, labels, ...)
        x, y = batch[0].to(device, non_blocking=True), batch[1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(model(x))
        labels.append(torch.as_tensor(y).to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if len(feats) != len(indices):
        raise RuntimeError(f"got {len(feats)} rows for {len(indices)} samples: the loader must not drop any")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        feats, labels, indices = (_all_gather(t) for t in (feats, labels, indices))  # same count on every rank
    n = len(loader.dataset)
    out_f = feats.new_empty((n,) + feats.shape[1:])
    out_y = labels.new_empty(n)
    out_f[indices] = feats  # padded duplicates write the same row twice
    out_y[indices] = labels
    return out_f, out_y


def _all_gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, chunk=512):
    """Weighted kNN class scores (n_test, num_classes): the k most cosine-similar
    training samples vote exp(sim / temperature) for their class."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)          # (c, N_train) -> (c, k)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(test), num_classes, device=test.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], weights))
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=200, temperature=0.1):
    """Top-1 accuracy (%) of the weighted kNN classifier."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels, (1,))[0]


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of rows whose label is among the k highest scores, for each k."""
    top = scores.topk(max(ks), dim=1).indices
    hit = top == labels.view(-1, 1)
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks]
