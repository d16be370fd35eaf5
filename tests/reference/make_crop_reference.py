"""Reference numbers for the official crop sampler, drawn by TensorFlow itself.

Draws boxes with tf.image.sample_distorted_bounding_box exactly as the official SimCLR code
(data_util.distorted_bounding_box_crop) calls it, at several image shapes, and writes their
percentiles to crop_reference.json beside this file; tests/test_augment.py compares
augment.official_crop_params against them. TensorFlow is not a dependency of this project:
run this in a throwaway environment.

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu numpy
    /tmp/tf/bin/python tests/reference/make_crop_reference.py
"""
import json
import os

import numpy as np
import tensorflow as tf

SHAPES = [(375, 500), (500, 375), (32, 32), (96, 96)]  # (height, width): landscape, portrait, CIFAR, STL-10
DRAWS = 20_000
QUANTILES = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]


@tf.function
def draw_boxes(image_size, n):
    """n boxes (offset_y, offset_x, h, w) for an image of image_size (h, w, 3)."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])  # the official code's box

    def one(_):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            image_size, bounding_boxes=bbox, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=100, use_image_if_no_bounding_boxes=True)
        return tf.stack([begin[0], begin[1], size[0], size[1]])

    return tf.map_fn(one, tf.range(n), fn_output_signature=tf.int32)


def summary(boxes, height, width):
    top, left, h, w = boxes.T.astype(np.int64)
    area, aspect = h * w / (height * width), w / h
    smaller = (h < height) | (w < width)
    far_edge = ((h < height) & (top + h == height)) | ((w < width) & (left + w == width))
    return {
        "height": height, "width": width, "draws": len(boxes), "quantiles": QUANTILES,
        # quantiles as sample values (inverted CDF), so discrete sizes at 32 px stay exact
        "area_fraction": np.quantile(area, QUANTILES, method="inverted_cdf").tolist(),
        "aspect": np.quantile(aspect, QUANTILES, method="inverted_cdf").tolist(),
        "area_min": float(area.min()), "area_max": float(area.max()),
        "aspect_min": float(aspect.min()), "aspect_max": float(aspect.max()),
        "share_whole_image": float((~smaller).mean()),
        "share_touching_bottom_or_right": float(far_edge.mean()),
        # how often each box size (h, w) came up, for the small images where rounding shapes the distribution
        "size_counts": ([[int(hh), int(ww), int(c)] for (hh, ww), c in zip(*np.unique(np.stack([h, w], 1), axis=0,
                                                                                        return_counts=True))]
                        if height * width <= 32 * 32 else None),
    }


def main():
    tf.random.set_seed(0)
    out = {"tensorflow": tf.__version__, "call": "tf.image.sample_distorted_bounding_box(bounding_boxes=[[[0, 0, 1, 1]]], "
           "min_object_covered=0.1, aspect_ratio_range=(3/4, 4/3), area_range=(0.08, 1.0), max_attempts=100, "
           "use_image_if_no_bounding_boxes=True)", "shapes": []}
    for height, width in SHAPES:
        boxes = draw_boxes(tf.constant([height, width, 3], tf.int32), DRAWS).numpy()
        out["shapes"].append(summary(boxes, height, width))
        s = out["shapes"][-1]
        print(f"{height}x{width}: area fraction median {s['area_fraction'][4]:.3f}, min {s['area_min']:.3f}; "
              f"aspect median {s['aspect'][4]:.3f}; whole image {s['share_whole_image']:.4f}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crop_reference.json")
    with open(path, "w") as f:  # one line per shape
        head = json.dumps({k: v for k, v in out.items() if k != "shapes"}, indent=1)[:-2]
        f.write(head + ',\n "shapes": [\n  ' + ",\n  ".join(json.dumps(s) for s in out["shapes"]) + "\n ]\n}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
