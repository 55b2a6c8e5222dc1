from pathlib import Path

from compress_cli.stages.registry import list_stages

REPO = Path(__file__).resolve().parents[1]


def test_readme_lists_every_stage_and_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    missing = [s for s in list_stages() if f"`{s}`" not in text]
    assert not missing, f"README stage table lacks {missing}"
