"""The end-to-end benchmarks (pipeline, interactive, busy machine) run and report consistent
figures (no speed is asserted)."""

from benchmarks import busy_machine, interactive, pipeline


def test_pipeline_benchmark_reports_every_variant(toy_models, tmp_path, capsys, monkeypatch):
    model = toy_models["transformer_sentencepiece"]
    kept = ("stock", "pipeline (1 thread)", pipeline.INLINE)  # the others differ only in flags
    monkeypatch.setattr(pipeline, "VARIANTS", {label: pipeline.VARIANTS[label] for label in kept})
    pipeline.main(
        [
            "--data-bin", str(model.data_bin), "--path", str(model.checkpoint), "--spm-model", str(model.bpe_model),
            "--source-lang", "src", "--target-lang", "tgt", "--batch-size", "16", "--repeats", "1",
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(pipeline.VARIANTS)
    assert all(row.endswith("| yes |") for row in rows)  # every variant wrote stock's exact file
    assert rows[0].split(" | ")[2] == "1.00x"
    assert "Stock's result: `Generate test with beam=5: BLEU = " in table
    assert "Post-processing (string conversion" in table


def test_interactive_benchmark_reports_latency_and_agreement(toy_models, capsys):
    model = toy_models["transformer_sentencepiece"]
    sources = model.data_bin.parent / "corpus" / "test.src"  # raw text; the benchmark applies BPE
    interactive.main(
        [
            "--data-bin", str(model.data_bin), "--path", str(model.checkpoint), "--spm-model", str(model.bpe_model),
            "--input", str(sources), "--source-lang", "src", "--target-lang", "tgt", "--sentences", "6",
            "--repeats", "1",
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "6 sentences x 1 repeats" in table
    row = table.splitlines()[-1].split(" | ")
    assert row[0] == "| interactive, --buffer-size 1" and row[-1] == "yes |"
    stock_ms, fast_ms, ratio = float(row[1]), float(row[2]), float(row[3].rstrip("x"))
    assert abs(ratio - stock_ms / fast_ms) < 0.01 + 0.01 * ratio  # rounded cells


def test_busy_machine_benchmark_reports_each_thread_setting(toy_models, capsys):
    model = toy_models["transformer"]
    busy_machine.main(
        [
            "--data-bin", str(model.data_bin), "--path", str(model.checkpoint), "--beam", "2",
            "--neighbour-threads", "1", "--threads", "1",
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "while a neighbour runs matrix products on 1 OpenMP threads" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "threads used" not in line]
    assert [row[0][2:] for row in rows] == [busy_machine.DEFAULT, "--fast-threads 1"]
    assert int(rows[0][1]) >= 1 and rows[1][1] == "1"
    assert min(row[4] for row in rows) == "1.00x |"


def test_a_run_leaves_no_data_loader_for_the_next_runs_timing(toy_models, tmp_path):
    """Its iterator sits in a reference cycle; collected later, its worker would be joined
    inside another run's timed loop."""
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    model = toy_models["transformer_sentencepiece"]
    common = pipeline.generate_args(str(model.data_bin), str(model.checkpoint), str(model.bpe_model), "src", "tgt", batch_size=16)
    pipeline.run_variant([*common, "--num-workers", "1"], [], tmp_path / "stock")
    assert not [obj for obj in gc.get_objects() if isinstance(obj, _MultiProcessingDataLoaderIter)]
