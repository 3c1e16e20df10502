"""`evofuse demo`: the demo search on SmolLM2-135M-Instruct (configs/demo.yaml).

Three experts are made from the base by short LoRA fine-tunes on distinct skills whose data
ships with Python or is generated from a seed (the Python reference text, two-digit addition,
picking the largest number), cached after the first run. A few Evolver generations merge them;
the end prints every parent and the best candidate on each task's dev and test split and
exports the best. Running it again resumes an unfinished demo or reprints a finished one.
"""
from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(run_dir: str | None = None, address: str | None = None, quiet: bool = False, fresh: bool = False) -> int:
    import shutil

    from search.config import load_config
    from search.results.report import results_table
    from search.run.session import default_run_dir, export_after_run, resume_search, start_search
    from search.run.store import RunStore

    root = Path(run_dir) if run_dir else default_run_dir(load_config(DEMO_CONFIG))
    if fresh and root.exists():
        shutil.rmtree(root)
    if RunStore(root).exists():
        resume_search(root, address=address, quiet=quiet)
    else:
        start_search(DEMO_CONFIG, root, address=address, quiet=quiet)
    export_after_run(root, quiet=quiet)
    print(results_table(root))
    exports = sorted((root / "exports").glob("*/config.json"))
    if exports:
        print(f"\nbest candidate exported to {exports[0].parent}")
    return 0
