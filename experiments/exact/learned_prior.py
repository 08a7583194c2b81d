"""Train (or find) the network of ``prior=learned`` and print its training curve and its diffusion loss against the
closed form's (the Bayes optimum), by t (sdbridge/priors/learned.py).

    python experiments/exact/learned_prior.py                       # the default: 16 px, ~14 min on 2 CPU cores
    python experiments/exact/learned_prior.py prior.size=32 prior.device=cuda

Arguments are ``prior=learned``'s fields (with or without ``prior.``). A run with ``prior=learned`` trains the same
network on first use; this script only does it ahead of time. The network is cached in ``prior.learned_dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdbridge.priors.learned import main  # noqa: E402

if __name__ == "__main__":
    main()
