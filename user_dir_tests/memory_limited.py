"""``fairseq-generate`` with its address space capped a little above what it has mapped at start.

    python -m user_dir_tests.memory_limited MEGABYTES FAIRSEQ-GENERATE-ARGS...

A real out-of-memory failure, reached in seconds on a tiny model with a huge batch.
"""

import resource
import sys

from fairseq_cli.generate import cli_main


def mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


if __name__ == "__main__":
    headroom = int(sys.argv.pop(1)) * 2**20
    limit = mapped_bytes() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cli_main()
