#!/usr/bin/env bash
# bash scripts/gpu_check.sh [OUT]      the checks only a CUDA GPU can run, in under 10 minutes on one GPU
#
# Runs from the repository root of an installed checkout (`make install`, or the project importable
# with torch+CUDA, transformers, peft, accelerate, bitsandbytes and galore-torch present) on a machine
# with one CUDA device. Each check is one `lorabench train` with a time limit; the records land in
# OUT (default results/gpu/<date>/) and `summary.md` there lists each check's status, metric, peak
# CUDA memory and tokens/s. A check that fails does not stop the others; the exit code is the number
# of failed checks.
#
#   1. bf16 + CUDA memory accounting: LoRA on SmolLM2-135M (hardware=gpu: bf16 autocast), 60 steps;
#      the record's cost.peak_memory.cuda_allocated_bytes and tokens/s.
#   2. 4-bit bases: qlora and loftq (bitsandbytes NF4 on CUDA), 30 steps each.
#   3. The GaLore family on CUDA: galore, galore_torch, fira, q_galore, 30 steps each.
#   4. FSDP2 on one device (fp32: bf16 under FSDP is refused): hardware=gpu_fsdp hardware.num_processes=1,
#      LoRA and full fine-tuning,
#      against the same runs under hardware=gpu (losses in the records, compared in summary.md).
#   4b. DeepSpeed ZeRO-2 and ZeRO-3 on one device (NCCL, fp32, LoRA), against plain_lora above.
#   5. A slice of a paper setting at real scale: MiniLM-L6 (the GLUE encoder of the leaderboard) on
#      SST-2 for 300 steps at the GaLore GLUE recipe's batch 16 (needs SST2_DIR, the GLUE SST-2 folder;
#      skipped with a line saying so when it is not set).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu/$(date -u +%Y-%m-%d_%H-%M)}
mkdir -p "$OUT"
LB=${LORABENCH:-lorabench}
command -v "$LB" >/dev/null || LB="python -m lorabench.cli"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
python - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 100; }
import torch
assert torch.cuda.is_available()
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

failed=0
LM=(model=smollm2_135m dataset=gsm_symbolic dataset.train_size=256 dataset.eval_size=32 dataset.max_new_tokens=64
    train.global_batch_size=8 train.eval_every=0 progress=false checkpoint.save_model=false)
check() {  # check NAME SECONDS OVERRIDES...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $LB train $*"
  if timeout "$limit" $LB train "$@" "results_dir=$OUT/$name" >"$OUT/$name.log" 2>&1; then
    echo "   ok"
  else
    echo "   FAILED (exit $?): tail of $OUT/$name.log"
    tail -5 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}

check bf16_lora 120 method=lora hardware=gpu train.max_steps=60 "${LM[@]}"
for m in qlora loftq; do
  check "4bit_$m" 90 method=$m hardware=gpu train.max_steps=30 "${LM[@]}"
done
for m in galore galore_torch fira q_galore; do
  check "cuda_$m" 90 method=$m hardware=gpu train.max_steps=30 "${LM[@]}"
done
for m in lora full; do
  check "fsdp1_$m" 90 method=$m hardware=gpu_fsdp hardware.num_processes=1 train.max_steps=20 "${LM[@]}"
  check "plain_$m" 90 method=$m hardware=gpu hardware.mixed_precision=no train.max_steps=20 "${LM[@]}"
done
for s in zero2 zero3; do
  check "${s}1_lora" 120 method=lora hardware=gpu_$s hardware.num_processes=1 hardware.mixed_precision=no \
    train.max_steps=20 "${LM[@]}"
done
if [ -n "${SST2_DIR:-}" ]; then
  check minilm_sst2_300 150 method=lora model=minilm_l6 dataset=sst2 "dataset.data_dir=$SST2_DIR" hardware=gpu \
    train.max_steps=300 train.global_batch_size=16 progress=false
else
  echo "== minilm_sst2_300: skipped (set SST2_DIR to the GLUE SST-2 folder to run it)"
fi

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| check | status | metric | cuda peak allocated (MiB) | tokens/s | losses (first, last) |", "|---|---|---|---|---|---|"]
for path in sorted(out.glob("*/*/record.json")):
    r = json.loads(path.read_text())
    m, c = r.get("metrics", {}), r.get("cost", {})
    final = (m.get("final") or {}).get(m.get("primary"), "-")
    peak = (c.get("peak_memory") or {}).get("cuda_allocated_bytes")
    losses = [e["loss"] for e in r.get("train_log", [])]
    lines.append(
        f"| {path.parent.parent.name} | {r['status']} | {final} | {peak / 2**20 if peak else '-'} | "
        f"{c.get('tokens_per_s', '-')} | {(losses[0], losses[-1]) if losses else '-'} |"
    )
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check: $failed failed; records and summary.md in $OUT"
exit "$failed"
