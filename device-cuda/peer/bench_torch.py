"""PyTorch peer of tests/examples/bench_gpu.rs, measuring the same things the same way on cuda:0:

- MatMul 4096x4096 f32 (allow_tf32=False) and f16: CUDA events around 10 products, median of 7
  (TFLOP/s).
- 256 MiB host-to-device and device-to-host copies between a pinned host tensor and a device
  tensor (non_blocking, events around each copy), median of 7 (GB/s).
- MLP 784-256-256-10 (ReLU), batch 128, sparse softmax cross-entropy, SGD(0.01): parameters and
  data on the GPU, steps/s as the median of 7 chunks, each ended by reading the loss.

Prints `RESULT name = value unit` lines with the names bench_gpu prints. Exit 2 without torch or
a GPU (the caller reports the peer as skipped).

  python3 bench_torch.py [--quick]
"""
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - any import failure means "no peer"
    print(f"peer skipped: cannot import torch: {e}")
    sys.exit(2)

N = 4096
COPY_BYTES = 256 << 20
BATCH = 128


def line(name, values, unit, extra=""):
    m = statistics.median(values)
    spread = f"[min {min(values) / m * 100:.0f}% max {max(values) / m * 100:.0f}% of median, n={len(values)}]"
    print(f"RESULT {name} = {m:.3f} {unit} {extra}{spread}", flush=True)


def matmul(dtype, name, reps, products):
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.rand(N, N, device="cuda", generator=g, dtype=torch.float32).mul_(2).sub_(1).to(dtype)
    b = torch.rand(N, N, device="cuda", generator=g, dtype=torch.float32).mul_(2).sub_(1).to(dtype)
    torch.matmul(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(reps):
        start.record()
        for _ in range(products):
            torch.matmul(a, b)
        end.record()
        end.synchronize()
        rates.append(2 * N**3 * products / (start.elapsed_time(end) / 1e3) / 1e12)
    line(name, rates, "TFLOP/s")


def copies(reps):
    host = torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
    host.copy_(torch.arange(COPY_BYTES, dtype=torch.int64).remainder_(251).to(torch.uint8))
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, up in [("gpu_h2d_pinned_256MiB", True), ("gpu_d2h_pinned_256MiB", False)]:
        rates = []
        for rep in range(reps + 1):
            start.record()
            if up:
                dev.copy_(host, non_blocking=True)
            else:
                host.copy_(dev, non_blocking=True)
            end.record()
            end.synchronize()
            if rep > 0:
                rates.append(COPY_BYTES / (start.elapsed_time(end) / 1e3) / 1e9)
        line(name, rates, "GB/s")


def mlp(reps, steps):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).cuda()
    x = torch.rand(BATCH, 784, device="cuda").mul_(2).sub_(1)
    y = (torch.arange(BATCH, device="cuda") * 7) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    l0 = step().item()
    for _ in range(10):
        step()
    rates, last = [], l0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        last = loss.item()
        rates.append(steps / (time.perf_counter() - t0))
    line("gpu_mlp_train_steps[batch=128]", rates, "steps/s", f"(loss {l0:.3f}->{last:.3f}) ")


def main():
    if not torch.cuda.is_available():
        print("peer skipped: torch sees no GPU")
        sys.exit(2)
    quick = "--quick" in sys.argv[1:]
    reps, products, steps = (3, 3, 20) if quick else (7, 10, 100)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"peer: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    matmul(torch.float32, f"gpu_matmul_f32_{N}", reps, products)
    matmul(torch.float16, f"gpu_matmul_f16_{N}", reps, products)
    copies(reps)
    mlp(reps, steps)


if __name__ == "__main__":
    main()
