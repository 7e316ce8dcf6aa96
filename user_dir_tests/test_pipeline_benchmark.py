"""The end-to-end pipeline benchmark runs and reports consistent figures (no speed is asserted)."""

from benchmarks import pipeline


def test_pipeline_benchmark_reports_every_variant(toy_models, tmp_path, capsys):
    model = toy_models["transformer_sentencepiece"]
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
