from pathlib import Path

from compress_cli.stages.registry import list_stages

REPO = Path(__file__).resolve().parents[1]


def test_readme_lists_every_stage_and_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    missing = [s for s in list_stages() if f"`{s}`" not in text]
    assert not missing, f"README stage table lacks {missing}"


def test_readme_layout_names_every_package():
    text = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    pkg = REPO / "compress_cli"
    names = sorted(
        p.stem
        for p in pkg.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file()
    )
    missing = [n for n in names if not any(f"`{n}{end}`" in text for end in ("", "/", ".py"))]
    assert not missing, f"README's Layout section does not describe {missing}"
