"""Train (or find) the network of ``prior=learned`` and print its training curve and its diffusion loss against the
closed form's (the Bayes optimum), by t (sdbridge/priors/learned.py).

    python experiments/exact/learned_prior.py                       # the default: the network shipped with sdbridge
    python experiments/exact/learned_prior.py prior.shipped=false   # train it here (16 px, 7000 steps: 44 min, 2 CPUs)
    python experiments/exact/learned_prior.py prior.size=32 prior.device=cuda

Arguments are ``prior=learned``'s fields (with or without ``prior.``). A run with ``prior=learned`` uses the shipped
network of the default config (sdbridge/priors/networks) and trains any other config's on first use; this script only
does it ahead of time. Trained networks are cached in ``prior.learned_dir``. To ship a retrained default network, copy
its file and its ``.sha256.json`` from there into sdbridge/priors/networks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdbridge.priors.learned import main  # noqa: E402

if __name__ == "__main__":
    main()
