"""The official codes' math and loops, re-derived on plain diffusers (no sdbridge): one copy, used by the parity
tests (tests/parity/test_*_parity.py check sdbridge's gradients against it) and by the side-by-side benchmark
(experiments/bench/official.py times sdbridge's loop against these loops).

Written from the official sources named in each module's docstring, not copied from them. Each class keeps the
official per-step structure as well as its math: which calls run under autograd or ``no_grad``, which text
embeddings are cached and which are encoded again, the random draws, and the loss trick that hands the gradient to
the latent; draws can be given instead (the parity tests fix t and the noise). Modules:

* :mod:`.pipeline`: the Stable Diffusion components as the official codes load them (a diffusers folder, or
  prebuilt modules for the random-weight SD 2.1 base of the benchmark);
* :mod:`.sds_bridge_2d`: davidmcall/SDS-Bridge ``2D_experiments`` (SDS, Bridge, NFSD, VSD; ``generate.py``'s loop),
  and CVMI-Lab's CSD gradient;
* :mod:`.threestudio_sdi`: threestudio's SDI guidance (PR #508) and the SDI notebook's loop;
* :mod:`.luciddreamer_ism`: LucidDreamer's ISM ``train_step``.
"""
