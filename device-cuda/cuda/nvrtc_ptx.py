#!/usr/bin/env python3
"""Compiles one CUDA C file to PTX with NVRTC (from the pip package nvidia-cuda-nvrtc-cu12).

Used by build_ptx.sh where no nvcc is installed: the pip package nvidia-cuda-nvcc-cu12 ships only
ptxas and libnvvm, not the nvcc driver, while NVRTC compiles the same CUDA C to the same PTX.
Usage: nvrtc_ptx.py ARCH INPUT.cu OUTPUT.ptx INCLUDE_DIR...
"""
import ctypes
import glob
import os
import sys


def load_nvrtc():
    import nvidia.cuda_nvrtc as pkg

    for d in pkg.__path__:
        for lib in sorted(glob.glob(os.path.join(d, "lib", "libnvrtc.so*"))):
            if "builtins" not in lib:
                return ctypes.CDLL(lib)
    sys.exit("libnvrtc.so not found; pip install nvidia-cuda-nvrtc-cu12")


def main():
    arch, src_path, out_path, *includes = sys.argv[1:]
    nvrtc = load_nvrtc()
    src = open(src_path, "rb").read()
    prog = ctypes.c_void_p()
    name = os.path.basename(src_path).encode()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None), "create")
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device"]
    opts += [f"-I{os.path.dirname(os.path.abspath(src_path))}"] + [f"-I{i}" for i in includes]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        sys.stderr.write(log.value.decode(errors="replace"))
    check(nvrtc, rc, f"compile {src_path}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx), "get PTX")
    with open(out_path, "wb") as f:
        f.write(ptx.value)


def check(nvrtc, rc, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"nvrtc {what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")


if __name__ == "__main__":
    main()
