"""pretrain.py as users run it, except that its step number OOM_AT (1-based, counted
in this process) raises the out-of-memory error of a GPU that is full.

    python tests/oom_worker.py PRETRAIN_FLAGS...        (OOM_AT, default 2; OOM_KIND: torch (default,
    torchrun ... tests/oom_worker.py PRETRAIN_FLAGS...   OutOfMemoryError), old (the plain RuntimeError of
                                                         older torch), cudnn or cublas (their allocation failures))
"""
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import loss  # noqa: E402

calls = 0
real = loss.contrastive_logits


def full_gpu(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(os.environ.get("OOM_AT", 2)):
        text = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 39.39 GiB total capacity)"
        kind = os.environ.get("OOM_KIND", "torch")
        if kind == "cudnn":
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        if kind == "cublas":
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        raise RuntimeError(text) if kind == "old" else torch.cuda.OutOfMemoryError(text)
    return real(*args, **kwargs)


loss.contrastive_logits = full_gpu  # pretrain.py imports it from loss when it starts
sys.argv = [os.path.join(ROOT, "pretrain.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
