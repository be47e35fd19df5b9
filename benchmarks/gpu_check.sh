#!/usr/bin/env bash
# All the GPU work of one device session, in one call of at most ~8 minutes: the GPU tests, the
# throughput cases (ours vs the HF baseline, pruning vs unmasked) and the data loader, each under its own
# time limit so that one slow part cannot eat the others. Why one script: device time is short (about
# 15 minutes a session, starts included), so nothing is typed interactively there.
#
#   device.run  carry: [".device-wheels"]   (bash ../shared/device/make-wheelhouse.sh first)
#   command:    bash benchmarks/gpu_check.sh            # installs, runs, writes $OUT/gpu_check/*.json
#
# On a machine without CUDA the same script is a dry run: the gpu tests skip, the throughput benchmark
# runs its tiny shapes; `GPU_CHECK_NO_INSTALL=1` skips the wheel install (use the current venv).
# Budgets (seconds) can be overridden: T_TESTS, T_THROUGHPUT, T_COMPILED, T_DATA (estimates: no device has run it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check_out}/gpu_check"
mkdir -p "$out"
py=python3
if [ -z "${GPU_CHECK_NO_INSTALL:-}" ] && [ -d .device-wheels ]; then
  $py -m pip install -q --no-deps .device-wheels/*.whl && $py -m pip install -q --no-deps -e . \
    || { echo "gpu_check: install failed" >&2; exit 3; }
fi

run() {  # run NAME SECONDS CMD...: time-limited, output to $out/NAME.log, rc to $out/NAME.rc
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0))" >"$out/$name.rc"
  echo "gpu_check: $name rc=$rc in $((SECONDS - t0)) s" >&2
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, transformers, composer, streaming; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'composer', composer.__version__, 'streaming', streaming.__version__)"
} >"$out/env.txt" 2>&1

# 1. GPU tests: FSDP2 (the path CI runs on CPU/gloo) + bf16 + activation checkpointing + save/autoresume (prune and CPT),
#    masked == cut in bf16, the attention path takes the flash kernel.
run tests "${T_TESTS:-170}" $py -m pytest -q -rs -m gpu tests/test_gpu.py --junitxml="$out/tests.xml"

# 2. Throughput at seq 4096: CPT of the 1.3B shape vs HF LlamaForCausalLM (same micro-batch, bf16), pruning
#    step of the 1.3B source vs its unmasked step; every model sharded with FSDP2 as train.py shards it
#    (`--fsdp`: layer units gathered in bf16, the L0 unit in fp32, our DTensor-aware clipping). The loss
#    levers beside the chunked LM head (train.py's): the full-logits loss it replaced (`cpt_full_logits`:
#    peak memory and tokens/s before vs after) and Liger's fused linear cross-entropy (`cpt_liger`; needs
#    `pip download --no-deps liger-kernel -d .device-wheels` before the session, else it reports "not
#    installed"). The JSON is rewritten after every case, so a timeout keeps the finished ones.
shape=(--seq-lens 4096 --micro-batches 1,2,4,6,8,12,16)  # without CUDA: the benchmark's tiny defaults
backend=inductor
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { shape=(); backend=aot_eager; }
run throughput "${T_THROUGHPUT:-180}" $py benchmarks/train_throughput.py --quick --fsdp "${shape[@]}" \
  --models 1.3b --cases cpt,hf,prune,unmasked,cpt_full_logits,cpt_liger --out "$out/throughput.json"

# 2b. The same CPT and pruning steps with every decoder layer compiled (train.py's `compile: true`).
run compiled "${T_COMPILED:-100}" $py benchmarks/train_throughput.py --quick --fsdp --compile \
  --compile-backend "$backend" "${shape[@]}" --models 1.3b --cases cpt,prune --out "$out/compiled.json"

# 3. The loader alone (CPU work on the GPU machine's cores), with and without mixture changes.
run data "${T_DATA:-40}" sh -c "$py benchmarks/data_throughput.py --seq-len 4096 --prep-mb 4 --loader-seconds 4 --workers 0 8 \
  --update-every 0 10 > '$out/data.json'"

# Summary: the last lines of the reply.
$py - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"env": (out / "env.txt").read_text().strip().splitlines()}
for part in ("tests", "throughput", "compiled", "data"):
    rc = (out / f"{part}.rc").read_text().split() if (out / f"{part}.rc").exists() else ["missing", "0"]
    summary[part] = {"rc": rc[0], "seconds": int(rc[1])}
log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
summary["tests"]["last_lines"] = log.strip().splitlines()[-3:]
try:
    tp = json.loads((out / "throughput.json").read_text())
    summary["throughput"]["complete"] = tp.get("complete")
    summary["throughput"]["results"] = [
        {k: r.get(k) for k in ("case", "model", "seq_len", "micro_batch", "tokens_per_s", "step_time_s",
                               "peak_mem_gib", "mfu_spec", "mfu_measured_matmul", "error")}
        for r in tp.get("results", [])]
    summary["throughput"]["comparisons"] = tp.get("comparisons")
except (OSError, ValueError) as e:
    summary["throughput"]["json_error"] = str(e)
try:
    cp = json.loads((out / "compiled.json").read_text())
    summary["compiled"]["results"] = [
        {k: r.get(k) for k in ("case", "model", "seq_len", "micro_batch", "tokens_per_s", "step_time_s",
                               "peak_mem_gib", "mfu_spec", "error")} for r in cp.get("results", [])]
except (OSError, ValueError) as e:
    summary["compiled"]["json_error"] = str(e)
try:
    summary["data"]["json"] = json.loads((out / "data.json").read_text())
except (OSError, ValueError) as e:
    summary["data"]["json_error"] = str(e)
# Issue target: the loader delivers >= 10x what the measured training step consumes (one GPU).
try:
    worst = min(r["tokens_per_s"] for r in summary["data"]["json"]["loader"])
    steps = {f'{r["case"]}_{r["model"]}': r["tokens_per_s"] for r in summary["throughput"]["results"]
             if r.get("tokens_per_s")}
    summary["loader_over_step"] = {k: round(worst / v, 1) for k, v in steps.items()}
except (KeyError, ValueError, TypeError):
    pass
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
