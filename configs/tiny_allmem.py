"""configs/tiny_gdn.py with the allmem memory (same teacher, data, window and demo report).

    python -m ahn_jax.train --config=configs/tiny_allmem.py --workdir=/tmp/tiny_allmem
"""

from configs import tiny_gdn


def get_config(arg=None):
    del arg
    return tiny_gdn.get_config("allmem")
