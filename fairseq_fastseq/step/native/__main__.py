"""``python -m fairseq_fastseq.step.native``: build the native kernels ahead of a search."""

from . import main

main()
