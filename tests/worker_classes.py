"""The worker classes tests start by dotted path (``--worker-class``): one place to change when they move."""

GPU_WORKER = "workers.runtime.gpu.GpuWorker"
