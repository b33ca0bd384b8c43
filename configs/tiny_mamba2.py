"""configs/tiny_gdn.py with the mamba2 memory (same teacher, data, window and demo report).

    python -m ahn_jax.train --config=configs/tiny_mamba2.py --workdir=/tmp/tiny_mamba2
"""

from configs import tiny_gdn


def get_config(arg=None):
    del arg
    return tiny_gdn.get_config("mamba2")
