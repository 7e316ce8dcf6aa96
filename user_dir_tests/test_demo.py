"""The README's first command ends with this demo: real translations, stock == fast."""

from fairseq_fastseq import demo


def test_demo_translates_bible_verses_identically(capsys):
    assert demo.main(["--verses", "3"]) == 0
    log = capsys.readouterr().out
    assert "agreement: 3/3 translations identical, stock vs fast (beam 5)" in log
    assert "en (fast): " in log and "Yahweh" in log  # it really translates (to the World English Bible's style)
