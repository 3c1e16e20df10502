"""What to try next: recipes, the operators that make weights from them, and populations.

    recipe.py         Recipe (small JSON: op, inputs, params, seed, base), mergekit settings
    rng.py            seeded, device-independent random draws
    registry.py       the operator table, parameter specs, `validate_recipe`
    steps.py          the Evolver's tensor steps (evolver, de_rand_1) and copy
    merge_methods.py  classic merges (linear, task_arithmetic, ties, dare_*, slerp)
    materialize.py    a recipe + input weight sets -> tensors, one tensor at a time
    evolver.py        offspring recipes and one-to-one greedy selection
    population.py     DEAP individuals, selection, hall of fame, seed and population merges

`evolve` works on recipes and plain `{name: tensor}` weights: it loads no models and never
imports `search` or `compression`.
"""

__all__: list[str] = []
