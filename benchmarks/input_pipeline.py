"""Input pipeline speed: training on a folder of small JPEGs, the plain epoch generator vs the grain pipeline.

A dataset of --images JPEGs (--size px, --classes classes) is written to a temporary folder and listed with
`data.imagefolder`; each training batch decodes its images and applies the random-resized-crop augmentation
(`data.preprocess.augment`, a pure function of (seed, epoch, row)) in `features.load_all`'s thread pool, as the
programs' batch builders do. A small convnet (two strided convs + linear head, --width channels) trains through
`trainer.fit` for --epochs epochs on

  before  a plain `epoch_batches(epoch)` generator (what `runner.epoch_batches` was): each batch is built in the
          training loop when its step comes, then placed on the devices;
  after   `data.pipeline.EpochBatches` (grain MapDataset): batches built ahead in --read-threads grain threads
          and placed on the devices 2 batches ahead of the step.

Both see the same batches in the same order (the final parameters are compared), the compile is in both. Printed:
images/s of each (median of --repeats alternating runs) and the ratio after/before.

  python benchmarks/input_pipeline.py                      # 3000 images at 64 px, 2 epochs
  python benchmarks/input_pipeline.py --images 500 --epochs 1 --repeats 1     # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vlm_jax.data import features as feats
from vlm_jax.data import imagefolder, pipeline, preprocess
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import trainer


def write_images(root: str, n: int, size: int, classes: int) -> None:
    """n JPEGs in root/train/<class>/ (a class-coloured gradient plus noise) and one per class in root/test/."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for split, count in (("train", n), ("test", classes)):
        for i in range(count):
            k = i % classes
            d = os.path.join(root, split, f"class_{k:02d}")
            os.makedirs(d, exist_ok=True)
            base = np.stack(np.broadcast_arrays(ramp[None, :] * (k + 1) / classes, ramp[:, None], k / classes), -1)
            img = np.clip(base * 255 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


class ConvNet(nn.Module):
    width: int
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def make_batches(ds, size: int):
    """make(rows, epoch, i): decoded, augmented images f32[B, size, size, 3] and labels i32[B]."""
    labels = np.array([e.label for e in ds.train], np.int32)

    def load(item):
        ex, seed = item
        return preprocess.augment(ex.path, np.random.default_rng(seed), size=size)

    def make(idx, epoch, i):
        items = [(ds.train[j], (0, epoch, int(j))) for j in idx]
        return {"images": feats.load_all(load, items), "labels": labels[idx]}
    return make


def train(epoch_batches, steps: int, args, mesh) -> tuple[float, np.ndarray]:
    """(seconds, final head kernel) of one `trainer.fit`."""
    model = ConvNet(args.width, args.classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))["params"]

    def loss_fn(p, batch, rng):
        logp = jax.nn.log_softmax(model.apply({"params": p}, batch["images"]))
        loss = -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], 1))
        return loss, {}

    t0 = time.perf_counter()
    fit = trainer.fit(loss_fn=loss_fn, params=params, param_groups=[(".*", 1.0)],
                      optim={"name": "adam", "lr": 1e-3}, num_epochs=args.epochs, steps_per_epoch=steps,
                      epoch_batches=epoch_batches, mesh=mesh, rng=jax.random.key(1), log_every_s=1e9)
    jax.block_until_ready(fit.state.params)
    return time.perf_counter() - t0, np.asarray(fit.state.params["Dense_0"]["kernel"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--read-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    mesh = mesh_lib.make_mesh()
    with tempfile.TemporaryDirectory() as root:
        write_images(root, args.images, args.size, args.classes)
        ds = imagefolder.load_image_folder(root, check_images=False)
        n, bs = len(ds.train), args.batch - args.batch % mesh_lib.batch_divisor(mesh)
        make, steps = make_batches(ds, args.size), len(ds.train) // bs
        seed = (0,)

        def before(epoch):   # the plain generator: each batch built when its step comes
            order = np.random.default_rng([*seed, epoch]).permutation(n)
            for i in range(steps):
                yield make(order[i * bs:(i + 1) * bs], epoch, i)
        after = pipeline.EpochBatches(n, (bs,) * steps, seed, make, mesh=mesh, read_threads=args.read_threads)

        times = {"before": [], "after": []}
        finals = {}
        for _ in range(args.repeats):
            for name, eb in (("before", before), ("after", after)):
                sec, finals[name] = train(eb, steps, args, mesh)
                times[name].append(sec)
        np.testing.assert_array_equal(finals["before"], finals["after"])   # the same batches, the same training
    images = steps * bs * args.epochs
    rate = {k: images / statistics.median(v) for k, v in times.items()}
    print(f"{n} JPEGs at {args.size} px, batch {bs}, {args.epochs} epochs ({images} images), {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs, grain read threads {args.read_threads}")
    for k in ("before", "after"):
        print(f"  {k:6s}  {rate[k]:8.1f} images/s   (runs: {', '.join(f'{t:.2f}' for t in times[k])} s)")
    print(f"  ratio after/before: {rate['after'] / rate['before']:.2f}")


if __name__ == "__main__":
    main()
