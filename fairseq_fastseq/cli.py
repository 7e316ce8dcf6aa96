"""``fairseq-fastseq-generate``: fairseq-generate driven by Hydra configs and overrides.

    fairseq-fastseq-generate task.data=DATA_BIN common_eval.path=CKPT generator=fast generation.beam=5
    fairseq-fastseq-generate preset=mt_beam5 task.data=DATA_BIN common_eval.path=CKPT
    fairseq-fastseq-generate --cfg job ...        # print the composed config and stop

Keys are fairseq's own (``FairseqConfig``) plus ``generator`` and ``fastseq.*``. The configs
live in the repository's ``configs/`` (installed under ``<prefix>/share/fairseq_fastseq``);
``--config-dir``/``--config-name`` select others. The composed config runs through the same
``fairseq_cli.generate.main`` as ``fairseq-generate``.
"""

import sys
from pathlib import Path

import hydra
from fairseq_cli import generate
from omegaconf import DictConfig

import fairseq_fastseq  # noqa: F401  (registers the generator choice and the schema fields)


def config_dir() -> Path:
    """``configs/`` of a checkout, else the copy installed with the package."""
    checkout = Path(__file__).resolve().parents[1] / "configs"
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "fairseq_fastseq" / "configs"


def _generate(cfg: DictConfig) -> None:
    generate.main(cfg)


def main() -> None:
    """The console script. ``hydra.main`` is applied here, not at import: it sets Hydra's
    process-wide version base (1.3), under which fairseq's own config conversion
    (``convert_namespace_to_omegaconf``, Hydra 1.1 style) fails in the importing process."""
    hydra.main(config_path=str(config_dir()), config_name="generate", version_base="1.3")(_generate)()


if __name__ == "__main__":
    main()
