"""sdbridge entry point: ``python run.py guidance=sds prior=sd21_base prompt.text="a DSLR photo of a dolphin"``.

Thin on purpose: the configuration lives in conf/ and sdbridge/config.py, the work in sdbridge/runner.py (sdbridge/cli.py: the Hydra glue).
"""

import hydra

import sdbridge.cli as cli


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    return cli.main(cfg)


if __name__ == "__main__":
    main()
