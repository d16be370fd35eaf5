"""Range checks of the scripts' numeric flags: every number finite and inside its interval, or
one line that names the flag, the interval and the value given.

    check(p.error, args, {"lr": "[0, inf)", "momentum": "[0, 1)", "temperature": "(0, inf)",
                          "epochs": "[1, inf)"})

Intervals are written as in mathematics: "[0, 1)" takes 0 and not 1, "inf" is unbounded.
Flags whose value is None (not given, no default) are left alone. check_image_size: the
smallest --image-size the encoder's stem takes (model.min_image_size).
"""
import math

from model import min_image_size


def _interval(text):
    """'[0, 1)' -> (0.0, True, 1.0, False): low, low included, high, high included."""
    low, high = (part.strip() for part in text.strip()[1:-1].split(","))
    return float(low), text.strip()[0] == "[", float(high), text.strip()[-1] == "]"


def _wording(text):
    low, low_in, high, high_in = _interval(text)
    if math.isinf(high):
        if low_in:
            return f"must be at least {low:g}"
        return "must be positive" if low == 0 else f"must be above {low:g}"
    return f"must lie in {text}"


def problem(name, value, interval):
    """The complaint about flag `name` (dest form: label_fraction) holding `value`, or None when it fits."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag} must be a finite number, not {value}"
    low, low_in, high, high_in = _interval(interval)
    inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    return None if inside else f"{flag} {_wording(interval)}, not {value:g}"


def check(error, args, intervals):
    """Call error(message) (argparse's parser.error, or distributed.fail) for the first flag of
    `intervals` ({dest: interval}) whose value in `args` is not a finite number inside its interval."""
    for name, interval in intervals.items():
        message = problem(name, getattr(args, name), interval)
        if message:
            error(message)


def check_image_size(error, size, cifar_stem):
    """Call error(message) (argparse's parser.error, or distributed.fail) when --image-size `size` is
    too small for an encoder with (or without) the CIFAR stem (image_size_problem)."""
    message = image_size_problem(size, cifar_stem)
    if message:
        error(message)


def image_size_problem(size, cifar_stem):
    """The complaint about --image-size `size` for an encoder with (or without) the CIFAR stem, or None:
    below model.min_image_size the last stage gets a 1x1 map."""
    least = min_image_size(cifar_stem)
    if size is None or size >= least:
        return None
    return (f"--image-size {size} is below the {least} px the encoder's {'CIFAR' if cifar_stem else 'ImageNet'} "
            f"stem needs: smaller images reach layer 4 as a 1x1 map, whose 3x3 convolutions see one pixel among "
            f"zero padding")
