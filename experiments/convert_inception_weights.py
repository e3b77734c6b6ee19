"""Converts pytorch-fid's FID Inception-v3 weights (.pth) to the .npz that
`ddm_jax.evaluation.inception.load_inception_variables` reads.

  curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m experiments.convert_inception_weights \
      --torch_weights=pt_inception-2015-12-05-6726825d.pth --npz=inception_fid.npz

Needs torch (the CPU build is enough). torch is not a dependency of ddm_jax: this script
alone imports it. The name and layout mapping (`inception.torch_state_dict_to_flax`) is
tested without torch and without the real file; the converted file is checked for every
expected name and shape before it is written.
"""

import os

from absl import app, flags
from flax import traverse_util

from ddm_jax.evaluation import inception

flags.DEFINE_string("torch_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
flags.DEFINE_string("npz", None, "The .npz to write (must not exist).")
flags.mark_flags_as_required(["torch_weights", "npz"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if os.path.exists(FLAGS.npz):
        raise app.UsageError(f"--npz={FLAGS.npz} exists; not overwriting it")
    import torch  # noqa: PLC0415 (optional: only this script needs torch)

    state_dict = torch.load(FLAGS.torch_weights, map_location="cpu", weights_only=True)
    flat = inception.torch_state_dict_to_flax({name: value.numpy() for name, value in state_dict.items()})
    inception.save_inception_variables(traverse_util.unflatten_dict(flat, sep="/"), FLAGS.npz)
    print(f"wrote {FLAGS.npz}: {len(flat)} arrays from {FLAGS.torch_weights}")


if __name__ == "__main__":
    app.run(main)
