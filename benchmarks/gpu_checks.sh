#!/usr/bin/env bash
# GPU checks of the cuda backend, for a session with a GPU machine:
#   build (JIT, or the prebuilt fused_vae._C), ptxas register/spill report,
#   tests/test_cuda.py (then its slow 64-bit indexing tests), the shared contract suite,
#   compute-sanitizer memcheck / racecheck / synccheck / initcheck over a short driver
#   that runs every kernel path, and a bandwidth check of forward+backward at 64M
#   elements against the measured copy bandwidth, then benchmarks/bench_gpu.py.
# Logs, a summary and raw JSON go to $OUT (default benchmarks/results/gpu-checks-<UTC time>).
#
#   bash benchmarks/gpu_checks.sh            # everything
#   SKIP_SANITIZER=1 bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-checks-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
status=0

step() {  # step NAME CMD...: runs CMD, log in $OUT/NAME.log, rc in summary.txt
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

step env bash -c 'nvidia-smi; nvcc --version; python -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
step build env FUSED_VAE_VERBOSE_BUILD=1 python -c '
import fused_vae as fv
info = fv.available_backends()
print(info)
assert info["cuda"].available, info["cuda"].reason
'
step ptxas nvcc -std=c++17 -O3 -DNDEBUG -Icsrc/include -gencode=arch=compute_90,code=sm_90 \
  -Xptxas -v -c csrc/cuda/kernels_instantiate.cu -o "$OUT/kernels_sm90.o"

step test_cuda python -m pytest -q -m "not slow" tests/test_cuda.py -p no:cacheprovider
step test_cuda_slow python -m pytest -q -m slow tests/test_cuda.py -p no:cacheprovider
step contract python -m pytest -q tests -k "cuda and not cuda_build" -p no:cacheprovider

# A short driver over every kernel path (dtypes, KL modes, samples, alignment, tails,
# single-block and multi-block reductions, broadcast gradients).
cat > "$OUT/sanitizer_driver.py" <<'EOF'
import itertools
import torch
import fused_vae as fv

assert fv.available_backends()["cuda"].available
fwd, bwd = torch.ops.fused_vae.reparam_kl_fwd, torch.ops.fused_vae.reparam_kl_bwd
dev = "cuda"
shapes = [(128, 32), (7, 13), (3, 1000), (40, 3000), (2, 9000), (2, 40000), (5, 3)]
count = 0
for dtype, shape, samples, mode, shift in itertools.product(
    (torch.float32, torch.float64, torch.float16, torch.bfloat16), shapes, (0, 1, 3), range(5), (0, 1)
):
    if samples == 0 and mode == 0:
        continue
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(2, n + 8, device=dev).to(dtype)
    mu = base[0, shift : shift + n].view(shape)
    lv = base[1, shift : shift + n].view(shape)
    seed = torch.tensor(1234, device=dev)
    clamp = (-1.0, 1.0) if shift else (None, None)
    z, kl = fwd(mu, lv, seed, samples, mode, *clamp)
    gz = torch.randn_like(z) if samples else None
    gkl = torch.randn_like(kl) if mode else None
    bwd(gz, gkl, mu, lv, seed, samples, mode, *clamp)
    if samples and mode in (1, 2):  # expanded (stride-0) output gradients
        bwd(torch.ones((), dtype=z.dtype, device=dev).expand_as(z),
            torch.ones((), dtype=kl.dtype, device=dev).expand_as(kl), mu, lv, seed, samples, mode, *clamp)
    count += 1
torch.cuda.synchronize()
print("driver ok:", count, "configurations")
EOF

if [ "${SKIP_SANITIZER:-0}" != "1" ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "sanitizer_$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 python "$OUT/sanitizer_driver.py"
  done
fi

# Bandwidth: fused forward+backward (8 elements of traffic per element: mu, logvar, z;
# grad_z, mu, logvar, grad_mu, grad_logvar) against a device-to-device copy.
cat > "$OUT/bandwidth.py" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import torch
import fused_vae as fv
from common import environment, time_calls

def timed(fn):
    """Median seconds per call (benchmarks/common.py's shared timing helper)."""
    return time_calls({"fn": fn}, min_run_time=1.0)["fn"]["median_s"]

dev = "cuda"
results = {"environment": environment(), "cases": []}
n = 64 * 1024 * 1024
src = torch.empty(4 * n, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
t = timed(lambda: dst.copy_(src))
copy_bw = 2 * src.numel() / t
results["copy_bytes_per_s"] = copy_bw
for dtype in (torch.float32, torch.bfloat16):
    for reduction in ("batchmean", "per_sample", "none"):
        mu = torch.randn(1 << 14, 4096, device=dev).to(dtype).requires_grad_()
        lv = torch.randn(1 << 14, 4096, device=dev).to(dtype).requires_grad_()
        seed = torch.tensor(3, device=dev)
        z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend="cuda")
        gz, gkl = torch.randn_like(z), torch.randn_like(kl)
        def fwd():
            return fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend="cuda")
        def fwd_bwd():
            z, kl = fwd()
            torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))
        with torch.no_grad():
            t_f = timed(fwd)
        t_fb = timed(fwd_bwd)
        size = mu.element_size()
        extra = 2 if reduction == "none" else 0  # KL out and its gradient in
        bw = (8 + extra) * n * size / t_fb
        case = dict(dtype=str(dtype), reduction=reduction, elements=n, fwd_s=t_f, fwd_bwd_s=t_fb,
                    fwd_bytes_per_s=(3 + extra // 2) * n * size / t_f, fwd_bwd_bytes_per_s=bw,
                    fraction_of_copy=bw / copy_bw)
        results["cases"].append(case)
        print(json.dumps(case))
json.dump(results, open(sys.argv[1], "w"), indent=2)
EOF
step bandwidth python "$OUT/bandwidth.py" "$OUT/bandwidth.json"
# The GPU benchmark, cuda next to triton.
step bench_gpu env PYTHONPATH=. python benchmarks/bench_gpu.py --backends cuda,triton --out "$OUT/bench_gpu.json"

echo "summary in $OUT/summary.txt (overall status $status)"
exit $status
