"""``compress validate --model``: load model and data, and let each stage say what it would touch."""

from __future__ import annotations

from compress_cli.config.recipe import Recipe


def dry_run(recipe: Recipe) -> tuple[list[str], list[str]]:
    """-> (what each stage would touch, the stages' up-front refusals of this model)."""
    from compress_cli.engine.setup import build_state, preflight, resolve_device
    from compress_cli.stages.registry import get_stage

    state = build_state(recipe, resolve_device(recipe.device), recipe.output_dir())
    n = sum(p.numel() for p in state.model.parameters())
    n_train, n_test = len(state.data.train_dataset), len(state.data.test_dataset)  # type: ignore[arg-type]
    lines = [
        f"model {recipe.model.source}: {n:,} parameters; data {recipe.data.source}: "
        f"{n_train} train / {n_test} test, "
        f"input {list(state.data.input_shape)}, {state.data.num_classes} classes"
    ]
    for i, cfg in enumerate(recipe.stages, start=1):
        stage = get_stage(cfg.type)(cfg, i)
        lines.append(f"{i}. {stage.name}")
        lines += [f"   {line}" for line in stage.preview(state)]
    return lines, preflight(state)
