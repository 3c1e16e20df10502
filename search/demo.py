"""`evofuse demo`: the demo search on SmolLM2-135M-Instruct (configs/demo.yaml, or
configs/demo-float32.yaml on a CPU that does not multiply bfloat16: `demo_config`).

Three experts are made from the base by short LoRA fine-tunes on distinct skills whose data
ships with Python or is generated from a seed (the Python reference text, two-digit addition,
picking the largest number), cached after the first run. A few Evolver generations merge them;
the end prints every parent and the best candidate on each task's dev and test split and
exports the best. Running it again resumes an unfinished demo or reprints a finished one.
"""
from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
FLOAT32_DEMO_CONFIG = CONFIGS / "demo-float32.yaml"


def demo_config(native_bfloat16: bool | None = None) -> Path:
    """The demo's config for this machine. demo.yaml screens its 384 offspring in bfloat16 where
    the CPU multiplies it (`fitness.screen_dtype: auto`); where torch emulates bfloat16 they are
    screened in float32 and that demo takes about 30 minutes on two cores, so there the demo is
    demo-float32.yaml: the same search with 160 offspring in one step, which fits the demo's
    15 minutes (README, "The demo")."""
    from search.config import load_config
    from search.run.stages import resolved_screen_dtype

    screens_cheaply = resolved_screen_dtype(load_config(DEMO_CONFIG), native_bfloat16) is not None
    return DEMO_CONFIG if screens_cheaply else FLOAT32_DEMO_CONFIG


def run_demo(run_dir: str | None = None, address: str | None = None, quiet: bool = False, fresh: bool = False) -> int:
    import shutil

    from search.config import load_config
    from search.results.report import results_table
    from search.run.session import default_run_dir, export_after_run, resume_search, start_search
    from search.run.store import RunStore

    config = demo_config()
    root = Path(run_dir) if run_dir else default_run_dir(load_config(config))
    if fresh and root.exists():
        shutil.rmtree(root)
    if RunStore(root).exists():
        resume_search(root, address=address, quiet=quiet)
    else:
        if config != DEMO_CONFIG and not quiet:
            shown = config.relative_to(CONFIGS.parent)
            print(f"this CPU does not multiply bfloat16: the demo runs {shown} (README, \"The demo\")")
        start_search(config, root, address=address, quiet=quiet)
    export_after_run(root, quiet=quiet)
    print(results_table(root))
    exports = sorted((root / "exports").glob("*/config.json"))
    if exports:
        print(f"\nbest candidate exported to {exports[0].parent}")
    return 0
