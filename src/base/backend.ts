// The two backends every layer names: CUDA GPUs, or simulated devices in host memory (CI, laptops).
export type Backend = "cuda" | "cpu";
