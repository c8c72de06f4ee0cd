"""Runs the JAX Med-2E3 on a golden-format fixture and writes every tensor its outputs.npz lists.

    python scripts/parity_dump.py --fixture tests/fixtures/med2e3_public --out /tmp/ours.npz

Float32 with the highest matmul precision; the names and shapes are the fixture's, so the two files
compare tensor by tensor. With the fixture's outputs.npz present, a comparison table is printed.
"""

import argparse
import logging
import os
import sys

import numpy as np

from med2e3_jax.parity import run_fixture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True, help="directory with config.json, model.safetensors, inputs.npz")
    parser.add_argument("--out", required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ours = run_fixture(args.fixture)
    reference_path = os.path.join(args.fixture, "outputs.npz")
    reference = dict(np.load(reference_path)) if os.path.exists(reference_path) else None
    if reference is not None:
        absent = sorted(set(reference) - set(ours))
        if absent:
            sys.exit(f"the model produced no tensor named {absent} (listed in {reference_path})")
        ours = {name: ours[name] for name in reference}
    np.savez(args.out, **ours)
    print(f"wrote {len(ours)} tensors to {args.out}")
    if reference is None:
        return
    print(f"{'tensor':24s} {'shape':18s} {'max|ref|':>10s} {'max|diff|':>10s}")
    for name, ref in reference.items():
        got = ours[name]
        if got.shape != ref.shape:
            print(f"{name:24s} shape {got.shape} != reference {ref.shape}")
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        if name == "logits":
            diff = diff[reference["merged_attention_mask"] > 0]
        print(f"{name:24s} {str(ref.shape):18s} {np.abs(ref).max():10.4g} {diff.max():10.3g}")


if __name__ == "__main__":
    main()
