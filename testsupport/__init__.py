"""Test support, kept out of the installed ``fairseq_fastseq`` package: the tiny fixture
models of the tests (``toy``), also used by the benchmarks. Importable from a checkout's root."""
