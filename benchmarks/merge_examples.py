"""mergekit `examples/`-style YAMLs and one YAML per registered merge method, on tiny models.

Shared by `tests/test_mergekit_examples.py` (parity) and `benchmarks/bench_merge_table.py`
(the README's table). Hub names are replaced by `{base}`, `{a}`, `{b}`, `{c}`: a base and three
fine-tunes of one architecture with 4 decoder layers (ranges are scaled to 4 layers).
`DEPTH` is the output depth where it differs from the inputs'.
"""
from __future__ import annotations

import yaml

# mergekit's examples, hub names replaced by {base} {a} {b} {c}; layer ranges scaled to 4 layers.
EXAMPLES = {
    "linear": """
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.3}}
merge_method: linear
dtype: float16
""",
    "ties": """
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "ties_unnormalized_fp32": """
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {b}
    parameters: {{density: 0.3, weight: 0.9}}
merge_method: ties
base_model: {base}
parameters: {{normalize: false}}
dtype: float32
""",
    "bio_merge_dare_ties_density_1": """
models:
  - model: {base}
  - model: {a}
    parameters: {{density: 1.0, weight: 0.5}}
  - model: {b}
    parameters: {{density: 1.0, weight: 0.3}}
merge_method: dare_ties
base_model: {base}
parameters: {{int8_mask: true}}
dtype: bfloat16
""",
    "slerp": """
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters: {{t: 0.4}}
dtype: bfloat16
""",
    "gradient_slerp": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
""",
    "gradient_slerp_two_slices": """
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [1, 3]}}
  - sources:
      - {{model: {a}, layer_range: [2, 4]}}
      - {{model: {b}, layer_range: [2, 4]}}
    parameters:
      t: [{{filter: mlp, value: [0.1, 0.9]}}]
merge_method: slerp
base_model: {a}
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.3}}]
dtype: float32
""",
    "orcamini_platy_frankenmerge": """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    "passthrough_scaled_fp32": """
slices:
  - sources:
    - {{model: {a}, layer_range: [0, 4]}}
  - sources:
    - {{model: {c}, layer_range: [2, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}
merge_method: passthrough
dtype: float32
""",
    "breadcrumbs_ties": """
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.02}}
  - model: {b}
    parameters: {{weight: 0.4, density: [0.5, 0.9], gamma: 0.05}}
merge_method: breadcrumbs_ties
base_model: {base}
dtype: float32
""",
    "model_stock": """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
    "task_arithmetic_fp16_out_fp32": """
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: -0.2}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 1.2}}
dtype: float16
out_dtype: float32
""",
}

# One YAML per registered merge method (mergekit's parameter names; random drops at density 0.5).
METHODS = {
    "linear": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
              "merge_method: linear\ndtype: float32\n",
    "task_arithmetic": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
                       "merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n",
    "ties": "models: [{{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3, density: 0.7}}}}]\n"
            "merge_method: ties\nbase_model: {base}\ndtype: float32\n",
    "dare_linear": "models: [{{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3, density: 0.5}}}}]\n"
                   "merge_method: dare_linear\nbase_model: {base}\ndtype: float32\n",
    "dare_ties": "models: [{{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3, density: 0.5}}}}]\n"
                 "merge_method: dare_ties\nbase_model: {base}\ndtype: float32\n",
    "slerp": "models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\ndtype: float32\n",
    "della": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
             "merge_method: della\nbase_model: {base}\nparameters: {{density: 0.5, epsilon: 0.1}}\ndtype: float32\n",
    "della_linear": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
                    "merge_method: della_linear\nbase_model: {base}\nparameters: {{density: 0.5, epsilon: 0.1}}\ndtype: float32\n",
    "breadcrumbs": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
                   "merge_method: breadcrumbs\nbase_model: {base}\nparameters: {{density: 0.8, gamma: 0.02}}\ndtype: float32\n",
    "breadcrumbs_ties": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
                        "merge_method: breadcrumbs_ties\nbase_model: {base}\nparameters: {{density: 0.8, gamma: 0.02}}\ndtype: float32\n",
    "sce": "models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\nmerge_method: sce\nbase_model: {base}\n"
           "parameters: {{select_topk: 0.5}}\ndtype: float32\n",
    "nearswap": "models: [{{model: {a}}}]\nmerge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.01}}\ndtype: float32\n",
    "arcee_fusion": "models: [{{model: {a}}}]\nmerge_method: arcee_fusion\nbase_model: {base}\ndtype: float32\n",
    "passthrough": "slices:\n  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n"
                   "merge_method: passthrough\ndtype: float32\n",
    "model_stock": "models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\nmerge_method: model_stock\nbase_model: {base}\ndtype: float32\n",
    "nuslerp": "models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.7}}}}]\n"
               "merge_method: nuslerp\nbase_model: {base}\ndtype: float32\n",
    "multislerp": "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.2}}}}]\n"
                  "merge_method: multislerp\nbase_model: {base}\ndtype: float32\n",
    "karcher": "models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\nmerge_method: karcher\ndtype: float32\n",
}
RANDOM_DROPS = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})  # density < 1 above
DEPTH = {"orcamini_platy_frankenmerge": 6, "passthrough_scaled_fp32": 6, "passthrough": 6}


def render(template: str, paths: dict) -> dict:
    """The config with the model placeholders filled in."""
    return yaml.safe_load(template.format(**{k: str(v) for k, v in paths.items()}))
