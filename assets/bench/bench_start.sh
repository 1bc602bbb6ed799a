# Sourced by the GPU bench scripts once OUT is set: makes OUT, sets PY (python3 unless given) and T0, and starts
# OUT/times.txt with the card and the torch version; `stamp message` appends "[seconds since T0] message" to it.
PY=${PY:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed) s] $*" | tee -a "$OUT/times.txt"; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__)"
} > "$OUT/times.txt" 2>&1
