"""Reads a TensorBoard run folder with TensorBoard's own reader and prints
what it holds as JSON: scalars by tag, images (step, size, PNG bytes in
hex), text by tag. Used by tests/tests/tensorboard.rs."""

import json
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

run = sys.argv[1]
# Keep everything: the default size guidance samples scalars and images.
acc = event_accumulator.EventAccumulator(
    run,
    size_guidance={
        event_accumulator.SCALARS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
    },
)
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]
    },
    "images": {
        tag: [[e.step, e.width, e.height, e.encoded_image_string.hex()] for e in acc.Images(tag)]
        for tag in tags["images"]
    },
    "text": {
        tag: [
            [e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()]
            for e in acc.Tensors(tag)
        ]
        for tag in tags["tensors"]
    },
}
json.dump(out, sys.stdout)
