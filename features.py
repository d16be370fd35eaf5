"""Features of a frozen network over a whole dataset, weighted kNN, top-k accuracy,
the progress line of long evaluation phases, and the move of an image batch to the
device (to_device: uint8 over the bus, float on the device).

Used by linear_eval.py, finetune.py and pretrain.py's kNN monitor. Under
torch.distributed each process runs its share of the dataset and every
process gets all rows back in dataset order: no sample is dropped or counted
twice (DistributedSampler's padding is removed).

Memory: features keep the dtype the model gives (bf16/fp16 under amp) and are held
once per process, on the GPU when they take at most a quarter of its free
memory (counting the blocks PyTorch's caching allocator holds but does not use,
which torch.cuda.mem_get_info counts as taken), else in host memory; they are gathered across processes one batch at a
time, so no GPU ever holds more than a batch of other processes' rows. kNN and
the cached-feature classifier stream chunks from wherever the features are:
nothing ever makes a float32 copy of the whole set. ImageNet, ResNet-50 4x
(8,192-d, 1.28M images, bf16): 21 GB, in host memory on a 40 or 80 GB GPU.

The kNN classifier is the weighted vote of Wu et al. 2018 used to monitor
SimCLR-style training: cosine similarity, k = 200 neighbours, each voting
exp(sim / 0.1) for its class; nearest() finds the neighbours (also export.py's picture of them).

    feats, labels = extract_features(encoder.eval(), loader, device)
    top1 = knn_accuracy(train_feats, train_labels, feats, labels, num_classes, device=device)
"""
import time

import torch
import torch.distributed as dist

DEVICE_SHARE = 0.25  # features stay on the GPU when they take at most this share of its free memory


class Progress:
    """Prints `WHAT: done/total images (p%), R img/s, elapsed, ETA` every `every` seconds.

        progress = Progress("train features", len(dataset), every=30)
        for x in batches: ...; progress.update(len(x))
    """

    def __init__(self, what, total, every=30.0, enabled=True):
        self.what, self.total, self.every, self.enabled = what, total, every, enabled
        self.start = self.last = time.time()
        self.done = 0

    @property
    def elapsed(self):
        return time.time() - self.start

    def update(self, n):
        """n more images done (all processes together)."""
        self.done = min(self.total, self.done + n)
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.what}: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.0f} img/s, elapsed {_hms(now - self.start)}, ETA {_hms(eta)}", flush=True)


def _hms(seconds):
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def to_device(x, device, channels_last=False):
    """A batch of images on `device` as float32 in [0, 1]. A uint8 batch (what the evaluation
    transforms and the views make) is copied as uint8, a quarter of float32's bytes, from the
    loader's pinned memory without waiting (non_blocking), and converted there, into
    channels_last or the plain layout in the same pass; a float batch is moved (and laid out)."""
    x = x.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format  # (the views come channels-last)
    if x.is_floating_point():
        return x.contiguous(memory_format=layout)
    return x.to(torch.float32, memory_format=layout).div_(255.0)


def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def extract_features(model, loader, device, amp=None, channels_last=False, store="auto", what="features",
                     progress_every=30.0):
    """model(x) for every sample of loader.dataset -> (features (N, d), labels (N,)).

    The loader must iterate a DistributedSampler without shuffling (possibly
    wrapped, as data.make_loader does); its images, uint8 or float, become float
    in [0, 1] on the device (to_device). amp: the autocast dtype (None: float32);
    features keep the dtype the model gives (bf16/fp16 under amp). Put the
    model in eval mode first.

    store: where the result lives: "device", "host" (CPU memory), or "auto":
    the device when the features take at most DEVICE_SHARE of its free memory
    (always on a CPU device), else the host. Every process gets all N rows:
    after each batch the processes all-gather that batch (equal shapes on every
    rank, since the sampler pads the shards to equal length) and write it into
    their own copy, so the device never holds more than world x batch rows of
    others. Rank 0 prints progress every `progress_every` seconds.
    """
    sampler = getattr(loader.sampler, "sampler", loader.sampler)
    indices = torch.tensor(list(iter(sampler)), dtype=torch.long)  # this rank's samples, in loader order
    world, n = _world(), len(loader.dataset)
    progress = Progress(what, n, progress_every, enabled=_rank() == 0)
    out_f = out_y = None
    done = 0
    for batch in loader:  # (images, labels, ...)
        x, y = to_device(batch[0], device, channels_last), batch[1]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = model(x)
        y = torch.as_tensor(y).to(device, non_blocking=True)  # a plain copy would make the host wait for the model
        idx = indices[done:done + len(f)].to(device, non_blocking=True)
        if len(idx) != len(f):
            raise RuntimeError(f"got more rows than the {len(indices)} samples of this process")
        done += len(f)
        if world > 1:
            f, y, idx = (_all_gather(t) for t in (f, y, idx))  # (world * b, ...), the same on every rank
        if out_f is None:
            out_f = _feature_store((n,) + f.shape[1:], f.dtype, device, store)
            out_y = torch.empty(n, dtype=y.dtype, device=out_f.device)
        where = out_f.device
        out_f[idx.to(where)] = f.to(where)  # padded duplicates write the same row twice
        out_y[idx.to(where)] = y.to(where)
        progress.update(len(f))
    if done != len(indices):
        raise RuntimeError(f"got {done} rows for {len(indices)} samples: the loader must not drop any")
    if out_f is None:
        raise RuntimeError("the dataset is empty")
    return out_f, out_y


def _feature_store(shape, dtype, device, store):
    if store not in ("auto", "device", "host"):
        raise ValueError(f"store must be 'auto', 'device' or 'host', not {store!r}")
    if store == "auto":
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        fits = device.type != "cuda" or nbytes <= DEVICE_SHARE * free_gpu_memory(device)
        store = "device" if fits else "host"
    # Host features are plain (pageable) memory: pinning the whole set would make the CUDA
    # host allocator round it up to a power of two (21 GB -> 32 GB); batches are staged
    # through a small pinned buffer instead (feature_batches).
    return torch.empty(shape, dtype=dtype, device=device if store == "device" else "cpu")


def free_gpu_memory(device):
    """Bytes a new tensor can take on a GPU: what the driver reports free plus what PyTorch's
    caching allocator has reserved but not allocated (after pretraining, most of the
    training step's memory), which mem_get_info counts as used."""
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def _all_gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def feature_batches(feats, labels, batch_size, device, generator=None):
    """(features, labels) batches on `device`, in order or shuffled by `generator`.

    Host features for a GPU are gathered row by row into one reused pinned buffer
    and copied to the device: a batch at a time, never the whole set."""
    order = torch.randperm(len(labels), generator=generator) if generator is not None else torch.arange(len(labels))
    if feats.device.type != "cpu" or device.type == "cpu":  # no host -> GPU copy: index where they are
        order = order.to(feats.device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield feats[idx].to(device), labels[idx].to(device)
        return
    staging = torch.empty((min(batch_size, len(order)),) + feats.shape[1:], dtype=feats.dtype, pin_memory=True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = torch.index_select(feats, 0, idx, out=staging[:len(idx)])
        # a blocking copy: the staging buffer is overwritten by the next batch
        yield rows.to(device), labels[idx].to(device)


def _unit_rows(x):
    """x as float32 with rows of unit L2 norm (as F.normalize), one new tensor."""
    x = x.to(torch.float32, copy=True)
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-12))


@torch.no_grad()
def nearest(queries, feats, k, exclude=None, device=None, query_chunk=1024, chunk=None, chunk_bytes=2 ** 27):
    """The k rows of feats (n, d) most cosine-similar to each row of queries (q, d) ->
    (similarities (q, k) float32, indices (q, k)) on `device` (default: the queries'), best first.
    exclude (q,): per query, one row of feats left out (the query's own, when it is one of them;
    -1: none). Ties keep the order topk gives.

    Chunked over both sets, so memory beyond the inputs stays bounded: each chunk of `chunk`
    rows of feats (default: chunk_bytes of float32) is moved to `device` and normalised once;
    every query chunk is compared with it and its best k merged into the running top k of that
    query chunk. The queries go to `device` once in their own dtype; the running top k take
    q x k x 12 bytes."""
    device = torch.device(device) if device is not None else queries.device
    n = len(feats)
    k = min(k, n)
    chunk = chunk or max(1, chunk_bytes // (4 * feats.shape[1]))
    queries = queries.to(device)
    exclude = exclude.to(device) if exclude is not None else None
    starts = range(0, len(queries), query_chunk)
    best = [(torch.empty(len(queries[a:a + query_chunk]), 0, device=device),
             torch.empty(len(queries[a:a + query_chunk]), 0, dtype=torch.long, device=device)) for a in starts]
    for s in range(0, n, chunk):
        rows = _unit_rows(feats[s:s + chunk].to(device))                       # (r, d)
        for j, a in enumerate(starts):
            sims = _unit_rows(queries[a:a + query_chunk]) @ rows.T              # (c, d) @ (d, r) -> (c, r)
            if exclude is not None:  # the excluded row, where it falls in this chunk, can never be chosen
                own = exclude[a:a + query_chunk] - s
                inside = (own >= 0) & (own < len(rows))
                sims[inside.nonzero().squeeze(1), own[inside]] = -float("inf")
            v, i = sims.topk(min(k, len(rows)), dim=1)
            v, i = torch.cat([best[j][0], v], 1), torch.cat([best[j][1], i + s], 1)
            v, pos = v.topk(min(k, v.shape[1]), dim=1)                          # merge: best k of both
            best[j] = (v, i.gather(1, pos))
    return torch.cat([v for v, _ in best]), torch.cat([i for _, i in best])


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, device=None,
                test_chunk=1024, train_chunk=None, chunk_bytes=2 ** 27):
    """Weighted kNN class scores (n_test, num_classes) on `device` (default: the test
    features'): the k most cosine-similar training samples (nearest(), chunked over both
    sets) vote exp(sim / temperature) for their class."""
    device = torch.device(device) if device is not None else test_feats.device
    sims, idx = nearest(test_feats, train_feats, k, device=device, query_chunk=test_chunk, chunk=train_chunk,
                        chunk_bytes=chunk_bytes)
    labels = train_labels.to(device)
    return torch.zeros(len(sims), num_classes, device=device).scatter_add_(1, labels[idx], (sims / temperature).exp())


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=200, temperature=0.1, device=None):
    """Top-1 accuracy (%) of the weighted kNN classifier, computed on `device`."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature, device)
    return topk_accuracy(scores, test_labels.to(scores.device), (1,))[0]


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of rows whose label is among the k highest scores, for each k."""
    top = scores.topk(max(ks), dim=1).indices
    hit = top == labels.view(-1, 1)
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks]
