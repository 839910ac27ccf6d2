"""Measures training input pipeline throughput (images/s) on in-memory PNG sources.

    python benchmarks/input_pipeline.py [--batches 40] [--threads 2]

Decode + resize-free path + augmentation + float conversion + batching, at 28x28 and 256x256,
in-process (num_workers=0) and with 2 worker processes. Images are smooth synthetic
"radiographs" (gradients, blobs, noise), so PNG sizes and decode cost resemble real CXRs more
than random noise would. Worker start-up is excluded (the first batch is a warm-up).
Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cxrjax.data import imageio, pipeline, sources

SPEC = sources.DatasetSpec("bench", ("normal", "pneumonia"))


def synthetic_radiograph(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth uint8 [size, size] image: vertical gradient, two dark 'lungs', mild noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.6 + 0.3 * y
    for cx in (0.3, 0.7):
        r2 = ((x - cx) / 0.18) ** 2 + ((y - 0.45) / 0.3) ** 2
        image -= 0.4 * np.exp(-r2) * rng.uniform(0.8, 1.2)
    image += rng.normal(0, 0.03, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def png_records(num: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": imageio.encode_png(synthetic_radiograph(size, rng)),
            "label": i % 2,
            "id": f"{i}",
        }
        for i in range(num)
    ]


def images_per_second(records, *, size, batch_size, num_batches, num_workers, num_threads):
    iterator = pipeline.make_train_iterator(
        records,
        SPEC,
        resolution=size,
        global_batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        num_threads=num_threads,
        process_index=0,
        process_count=1,
        device_count=1,
    )
    try:
        next(iterator)  # Warm-up: thread pool and worker start-up.
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        return num_batches * batch_size / (time.perf_counter() - start)
    finally:
        iterator.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads per process")
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f})")
    print(f"batch {args.batch_size}, {args.batches} timed batches, augmentation on")
    print(f"{'resolution':>10} | {'workers':>7} | {'PNG KiB':>7} | {'images/s':>9}")
    for size, num in ((28, 2048), (256, 512)):
        records = png_records(num, size)
        kib = np.mean([len(r["image"]) for r in records]) / 1024
        for num_workers in (0, 2):
            rate = images_per_second(
                records,
                size=size,
                batch_size=args.batch_size,
                num_batches=args.batches,
                num_workers=num_workers,
                num_threads=args.threads,
            )
            print(f"{size:>7}x{size:<2} | {num_workers:>7} | {kib:>7.1f} | {rate:>9.0f}")


if __name__ == "__main__":
    main()
