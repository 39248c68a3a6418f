"""docs/configuration.md is generated from the option declarations and must match."""

from pathlib import Path

from sp_pipeline import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_matches_the_declarations():
    assert DOC.read_text() == config.render_markdown(), (
        "docs/configuration.md is stale: run python -m sp_pipeline.config > docs/configuration.md"
    )


def test_every_option_is_documented_with_flag_and_env():
    text = DOC.read_text()
    for opt in config.OPTIONS:
        assert f"`{opt.flag}`" in text and f"`{opt.env}`" in text
