"""fairseq_fastseq: ``--user-dir fairseq_fastseq --generator fast`` makes fairseq generation
faster with token-for-token the same output. Importing it changes nothing in fairseq until
a run selects ``--generator fast`` (see ``hook.py``), except that fairseq checkpoints load
under torch's safe unpickler (see ``safe_load.py``).
"""

from . import config, hook, models, registry, safe_load, tasks  # noqa: F401  (registries: --generator, --task, --arch)

safe_load.allow_fairseq_checkpoint_globals()
config.extend_hydra_schema()
hook.install()
