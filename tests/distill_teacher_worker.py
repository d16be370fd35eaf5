"""distill.py as `python distill.py ARGS` runs it (under torchrun too), with its teacher watched:
every forward records the teacher's mode, whether gradients were on and its output's dtype, and at the
end rank 0 compares the teacher's weights and BN statistics with those of the file and writes what it
found to REPORT.json, for tests/test_cuda.py.

    torchrun --standalone --nproc_per_node=1 tests/distill_teacher_worker.py REPORT.json TEACHER.pt [FLAGS]
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import distill  # noqa: E402
import output  # noqa: E402
from distributed import run  # noqa: E402
from model import CheckpointError, load_classifier  # noqa: E402


def main():
    report, teacher_path = sys.argv[1], sys.argv[2]
    sys.argv = ["distill.py", *sys.argv[2:]]
    seen = {"forwards": []}

    def load(path, ckpt, encoder):  # distill.py's load_classifier, the teacher kept for the checks
        teacher = load_classifier(path, ckpt, encoder)
        forward = teacher.forward

        def watched(x):
            out = forward(x)
            seen["forwards"].append((teacher.training, torch.is_grad_enabled(), str(out.dtype).split(".")[-1]))
            return out
        teacher.forward = watched
        seen["teacher"] = teacher
        return teacher
    distill.load_classifier = load
    distill.main()
    if os.environ.get("RANK", "0") == "0":
        teacher = seen["teacher"]
        saved = load_classifier(teacher_path).state_dict()  # the file, read afresh (weights and BN statistics)
        now = teacher.state_dict()
        with open(report, "w") as f:
            json.dump({"forwards": len(seen["forwards"]),
                       "training": sum(mode for mode, _, _ in seen["forwards"]),
                       "grad_enabled": sum(grad for _, grad, _ in seen["forwards"]),
                       "dtypes": sorted({dtype for _, _, dtype in seen["forwards"]}),
                       "devices": sorted({str(t.device) for t in now.values()}),
                       "requires_grad": [k for k, p in teacher.named_parameters() if p.requires_grad],
                       "changed": [k for k in saved if not torch.equal(now[k].cpu(), saved[k])],
                       "keys": sorted(now) == sorted(saved)}, f)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
